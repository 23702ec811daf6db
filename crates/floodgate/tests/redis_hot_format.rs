//! The limiter's `hot` value is packed (`struct`, lua/common.lua's HOT_FMT); an older release
//! wrote it as `|`-separated text. A limiter whose `hot` is still text must behave exactly as
//! one whose `hot` was always packed: the general path reads the text, and the first call
//! rewrites it packed, after which the fast paths run again.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

/// The test clock's start (the script takes `op@now`, as tests/twin.rs drives it).
const T0: u64 = 1_000_000_000;
const HOUR_US: u64 = 3_600_000_000;

/// Rewrites a packed `hot` as the text an older release's `finish()` wrote: the same fields in
/// the same order, integers with `%d`, an absent field (-1 packed) empty.
const TO_TEXT: &str = r"
local v = {struct.unpack('<c1c1dddddddddddddddddddddd', redis.call('GET', KEYS[1]))}
local out = {v[1]}
for i = 3, 24 do
  if v[i] == -1 then out[#out + 1] = '' else out[#out + 1] = string.format('%d', v[i]) end
end
redis.call('SET', KEYS[1], table.concat(out, '|'), 'KEEPTTL')
return table.concat(out, '|')
";

struct Limiter {
    keys: Vec<String>,
    name: String,
}

impl Limiter {
    fn new(name: &str) -> Self {
        let keys = [
            "meta", "holders", "leases", "queue", "heavy", "waits", "outcomes", "otimes", "hot",
            "tokens", "dead",
        ]
        .map(|k| format!("fg:{{{name}}}:{k}"))
        .to_vec();
        Limiter {
            keys,
            name: name.to_owned(),
        }
    }

    fn call(
        &self,
        conn: &mut redis::Connection,
        script: &redis::Script,
        op: &str,
        now: u64,
        args: &[&str],
    ) -> Vec<String> {
        let mut inv = script.prepare_invoke();
        for k in &self.keys {
            inv.key(k);
        }
        inv.arg(format!("{op}@{now}"))
            .arg(&self.name)
            .arg(3_600_000_u64);
        for a in args {
            inv.arg(*a);
        }
        inv.invoke(conn).expect("the script runs")
    }

    fn hot(&self, conn: &mut redis::Connection) -> Vec<u8> {
        redis::cmd("GET").arg(&self.keys[8]).query(conn).unwrap()
    }
}

#[test]
fn a_text_hot_value_of_an_older_release_is_read_and_rewritten_packed() {
    let server = support::RedisServer::start();
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let script = redis::Script::new(&floodgate::store::redis::script_source());
    let to_text = redis::Script::new(TO_TEXT);
    let (hour, queue) = (HOUR_US.to_string(), "100".to_owned());
    let mut put: Vec<&str> = vec!["2", &hour, &hour, &queue, "1"];
    put.extend([""; 10]);
    let (old, new) = (Limiter::new("text"), Limiter::new("packed"));
    let mut now = T0;
    // Every step on both limiters at the same clock; `text` has its `hot` turned into text
    // before the steps marked so. Replies and statuses must be the same.
    let acquire = |key: &'static str| -> Vec<&'static str> { vec!["1", "", "", key, "ch"] };
    let steps: Vec<(bool, &str, Vec<&str>)> = vec![
        (false, "put", put.clone()),
        (false, "acquire", acquire("h1")),
        (false, "acquire", acquire("h2")),
        (true, "acquire", acquire("q1")),
        (false, "acquire", acquire("q2")),
        (true, "release", vec!["TOKEN", "ch"]),
        (true, "acquire", acquire("q3")),
        (false, "release", vec!["TOKEN", "ch"]),
    ];
    let mut tokens: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for (to_text_first, op, args) in steps {
        now += 1_000;
        let mut replies = Vec::new();
        for (i, l) in [&old, &new].into_iter().enumerate() {
            if to_text_first && i == 0 {
                let text: String = to_text.key(&l.keys[8]).invoke(&mut conn).unwrap();
                assert_eq!(text.matches('|').count(), 22, "{text}");
                assert_eq!(l.hot(&mut conn)[1], b'|');
            }
            let token = if op == "release" {
                tokens[i].remove(0)
            } else {
                String::new()
            };
            let args: Vec<&str> = args
                .iter()
                .map(|a| if *a == "TOKEN" { token.as_str() } else { a })
                .collect();
            let r = l.call(&mut conn, &script, op, now, &args);
            if r[0] == "granted" {
                tokens[i].push(r[1].clone());
            }
            if op == "release" && r.len() == 5 {
                // released, 1, the head's key, its grant's outcome (answered in the reply), next.
                tokens[i].push(r[3].split('|').nth(1).unwrap().to_owned());
            }
            // Packed again after any call on it.
            assert_eq!(l.hot(&mut conn)[1], b'#', "{} after {op}", l.name);
            let status = l.call(&mut conn, &script, "status", now, &[]);
            // The last field, the delay to the next deadline, is exact on the general path and a
            // lower bound on the fast ones (lua/common.lua), which only `packed` may take here.
            replies.push((r[..r.len() - 1].to_vec(), status));
        }
        assert_eq!(replies[0], replies[1], "{op} {args:?}");
    }
    // The queue moved as it should: q1 then q2 granted by the two releases, q3 waiting.
    let status = new.call(&mut conn, &script, "status", now, &[]);
    let schema = floodgate::store::redis::status_schema();
    let field = |name: &str| &status[1 + schema.iter().position(|f| *f == name).unwrap()];
    assert_eq!(field("in_use"), "2");
    assert_eq!(field("waiting"), "1");
}
