//! The limiter's `hot` value is packed (`struct`, lua/common.lua's HOT_FMT) in a field of the
//! `holders` hash; older releases kept it in its own key `hot`, first as `|`-separated text, then
//! packed. A limiter whose `hot` is still in its own key, text or packed, must behave exactly as
//! one whose `hot` was always a packed field: the general path reads the key, and the first call
//! rewrites it packed into `holders` and deletes the key, after which the fast paths run again.

#![cfg(feature = "redis")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

/// The test clock's start (the script takes `op@now`, as tests/twin.rs drives it).
const T0: u64 = 1_000_000_000;
const HOUR_US: u64 = 3_600_000_000;

/// Moves the packed `hot` field of `holders` (KEYS[1]) to the `hot` key (KEYS[2]), as an older
/// release kept it: as the text its `finish()` wrote when ARGV[1] is `text` (the same fields in
/// the same order, integers with `%d`, an absent field (-1 packed) empty), else packed as is.
const TO_OLD: &str = r"
local packed = redis.call('HGET', KEYS[1], 'hot')
redis.call('HDEL', KEYS[1], 'hot')
if ARGV[1] ~= 'text' then
  redis.call('SET', KEYS[2], packed)
  return 'packed'
end
local v = {struct.unpack('<c1c1dddddddddddddddddddddd', packed)}
local out = {v[1]}
for i = 3, 24 do
  if v[i] == -1 then out[#out + 1] = '' else out[#out + 1] = string.format('%d', v[i]) end
end
redis.call('SET', KEYS[2], table.concat(out, '|'))
return table.concat(out, '|')
";

struct Limiter {
    keys: Vec<String>,
    name: String,
}

impl Limiter {
    fn new(name: &str) -> Self {
        let keys = floodgate::store::redis::limiter_keys("fg", name).to_vec();
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

    /// The `hot` field of `holders`, and the `hot` key (empty when absent).
    fn hot(&self, conn: &mut redis::Connection) -> (Vec<u8>, Vec<u8>) {
        let field: Option<Vec<u8>> = redis::cmd("HGET")
            .arg(&self.keys[1])
            .arg("hot")
            .query(conn)
            .unwrap();
        let key: Option<Vec<u8>> = redis::cmd("GET").arg(&self.keys[8]).query(conn).unwrap();
        (field.unwrap_or_default(), key.unwrap_or_default())
    }
}

#[test]
fn a_hot_value_of_an_older_release_is_read_and_moved_packed_into_holders() {
    let server = support::RedisServer::start();
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let script = redis::Script::new(&floodgate::store::redis::script_source());
    let to_old = redis::Script::new(TO_OLD);
    let (hour, queue) = (HOUR_US.to_string(), "100".to_owned());
    let mut put: Vec<&str> = vec!["2", &hour, &hour, &queue, "1"];
    put.extend([""; 10]);
    let (old, new) = (Limiter::new("text"), Limiter::new("packed"));
    let mut now = T0;
    // Every step on both limiters at the same clock; `text` has its `hot` moved to the `hot` key
    // before the steps marked so, as text (`Some(true)`) or packed (`Some(false)`). Replies and
    // statuses must be the same.
    let acquire = |key: &'static str| -> Vec<&'static str> { vec!["1", "", "", key, "ch"] };
    let steps: Vec<(Option<bool>, &str, Vec<&str>)> = vec![
        (None, "put", put.clone()),
        (None, "acquire", acquire("h1")),
        (None, "acquire", acquire("h2")),
        (Some(true), "acquire", acquire("q1")),
        (None, "acquire", acquire("q2")),
        (Some(true), "release", vec!["TOKEN", "ch"]),
        (Some(false), "acquire", acquire("q3")),
        (None, "release", vec!["TOKEN", "ch"]),
        (Some(false), "release", vec!["TOKEN", "ch"]),
        (Some(true), "acquire", acquire("q4")),
    ];
    let mut tokens: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for (to_old_first, op, args) in steps {
        now += 1_000;
        let mut replies = Vec::new();
        for (i, l) in [&old, &new].into_iter().enumerate() {
            if let (Some(text), 0) = (to_old_first, i) {
                let arg = if text { "text" } else { "packed" };
                let old: String = to_old
                    .key(&l.keys[1])
                    .key(&l.keys[8])
                    .arg(arg)
                    .invoke(&mut conn)
                    .unwrap();
                let (field, key) = l.hot(&mut conn);
                assert!(field.is_empty());
                if text {
                    assert_eq!(old.matches('|').count(), 22, "{old}");
                    assert_eq!(key[1], b'|');
                } else {
                    assert_eq!(key[1], b'#');
                }
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
            // Packed in `holders` again after any call on it, and the old key gone.
            let (field, key) = l.hot(&mut conn);
            assert_eq!(field[1], b'#', "{} after {op}", l.name);
            assert!(key.is_empty(), "{} after {op}", l.name);
            let status = l.call(&mut conn, &script, "status", now, &[]);
            // The last field, the delay to the next deadline, is exact on the general path and a
            // lower bound on the fast ones (lua/common.lua), which only `packed` may take here.
            replies.push((r[..r.len() - 1].to_vec(), status));
        }
        assert_eq!(replies[0], replies[1], "{op} {args:?}");
    }
    // The queue moved as it should: q1, q2, q3 granted by the three releases, q4 waiting.
    let status = new.call(&mut conn, &script, "status", now, &[]);
    let schema = floodgate::store::redis::status_schema();
    let field = |name: &str| &status[1 + schema.iter().position(|f| *f == name).unwrap()];
    assert_eq!(field("in_use"), "2");
    assert_eq!(field("waiting"), "1");
}
