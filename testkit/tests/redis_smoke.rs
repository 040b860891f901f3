//! The test bed's Redis is real: a Lua check-and-reserve is atomic under concurrency.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use aigw_testkit::{Testbed, unique_name};

/// Reserve ARGV[1] from the balance at KEYS[1] only if it suffices; 1 = reserved, 0 = refused.
const RESERVE: &str = r"
local balance = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount = tonumber(ARGV[1])
if balance >= amount then
  redis.call('DECRBY', KEYS[1], amount)
  return 1
end
return 0
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reservations_never_overspend() {
    let client = Testbed::load().unwrap().redis().unwrap();
    let key = unique_name("balance");
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("SET")
        .arg(&key)
        .arg(100)
        .query_async(&mut conn)
        .await
        .unwrap();

    let script = redis::Script::new(RESERVE);
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (client, key, script) = (client.clone(), key.clone(), script.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            script
                .key(&key)
                .arg(3)
                .invoke_async::<i64>(&mut conn)
                .await
                .unwrap()
        }));
    }
    let mut granted = 0;
    for t in tasks {
        granted += t.await.unwrap();
    }
    let left: i64 = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(granted, 33, "100 / 3 = 33 reservations fit");
    assert_eq!(left, 1);
    let () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
}
