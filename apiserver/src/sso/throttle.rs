//! Sign-in throttling in Redis: attempts are counted per account (`tenant id` + username, known
//! or not, so the throttle tells nothing about which users exist) and per source address (an IPv6
//! address by its /64), in a fixed window that starts with the first attempt. The count is taken
//! *before* any password work, in one script, so a burst of parallel attempts cannot all pass a
//! check made before any of them is counted. Past either limit, attempts are refused until the
//! window ends. A successful sign-in clears its account's count and gives its address's attempt
//! back.

use super::{Sso, secs};

/// `KEYS[1]` account, `KEYS[2]` address; `ARGV[1]` window in seconds. Counts the attempt and
/// returns both counts and the seconds left in each window.
const COUNT: &str = r"
local a = redis.call('INCR', KEYS[1])
if a == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
local b = redis.call('INCR', KEYS[2])
if b == 1 then redis.call('EXPIRE', KEYS[2], ARGV[1]) end
return {a, b, redis.call('TTL', KEYS[1]), redis.call('TTL', KEYS[2])}
";

/// `KEYS[1]` account, `KEYS[2]` address: a success clears the account's count and gives the
/// address its attempt back — only while the window still runs (a `DECR` on an expired key
/// would leave a counter without expiry).
const SUCCEEDED: &str = r"
redis.call('DEL', KEYS[1])
local b = tonumber(redis.call('GET', KEYS[2]) or '0')
if b > 0 then redis.call('DECR', KEYS[2]) end
return 0
";

/// The two counters of one attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    account: String,
    address: String,
}

/// The address bucket: IPv4 as is, IPv6 by its /64 (one host usually has a whole /64).
fn bucket(address: &str) -> String {
    match address.parse::<std::net::Ipv6Addr>() {
        // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d: each is its own bucket.
        Ok(v6) if v6.to_ipv4_mapped().is_some() => v6
            .to_ipv4_mapped()
            .map_or_else(String::new, |v4| v4.to_string()),
        Ok(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Err(_) => address.to_owned(),
    }
}

impl Sso {
    /// The counters of an attempt at `username` (already checked to be a valid, ASCII username,
    /// or `None` for one that is not: those share one bucket).
    pub fn attempt(&self, tenant_id: i64, username: Option<&str>, address: &str) -> Attempt {
        let account = username.map_or_else(|| "~invalid".to_owned(), str::to_ascii_lowercase);
        Attempt {
            account: self.key(&format!("fail:acct:{tenant_id}:{account}")),
            address: self.key(&format!("fail:addr:{}", bucket(address))),
        }
    }

    /// Counts the attempt; `Some(seconds to wait)` when it is over a limit and must be refused.
    pub async fn count_attempt(&self, a: &Attempt) -> Result<Option<i64>, redis::RedisError> {
        let s = self.settings();
        let (acct, addr, acct_ttl, addr_ttl): (i64, i64, i64, i64) = redis::Script::new(COUNT)
            .key(&a.account)
            .key(&a.address)
            .arg(secs(s.failure_window))
            .invoke_async(&mut self.redis())
            .await?;
        Ok(if acct > s.account_failures {
            Some(acct_ttl.max(1))
        } else if addr > s.address_failures {
            Some(addr_ttl.max(1))
        } else {
            None
        })
    }

    /// A successful sign-in: the account's count is cleared, the address's attempt given back.
    pub async fn succeeded(&self, a: &Attempt) -> Result<(), redis::RedisError> {
        redis::Script::new(SUCCEEDED)
            .key(&a.account)
            .key(&a.address)
            .invoke_async::<i64>(&mut self.redis())
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ipv6_addresses_count_by_their_64() {
        assert_eq!(super::bucket("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(super::bucket("2001:db8:1:2:ffff::9"), "2001:db8:1:2::/64");
        assert_eq!(super::bucket("203.0.113.9"), "203.0.113.9");
        assert_eq!(super::bucket("::ffff:203.0.113.9"), "203.0.113.9");
        assert_eq!(super::bucket("::ffff:198.51.100.1"), "198.51.100.1");
    }
}
