// Sign-in: the token travels in a POST body only (never a URL), and comes back as an
// HttpOnly session cookie the page cannot read.
document.getElementById('signin').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const err = document.getElementById('err');
  err.textContent = '';
  const token = document.getElementById('token').value;
  try {
    const r = await fetch('/dashboard/login', {
      method: 'POST',
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({token}),
      credentials: 'same-origin',
    });
    if (r.ok) { location.replace('/'); return; }
    err.textContent = r.status === 401 ? 'Wrong token.' : 'Sign-in failed (' + r.status + ').';
  } catch (e) {
    err.textContent = 'Server unreachable.';
  }
});
