//! Sign-in throttling in Redis: failures are counted per account (`tenant id` + username, known
//! or not, so the throttle tells nothing about which users exist) and per source address, in a
//! fixed window that starts with the first failure. Once either count reaches its limit, sign-in
//! attempts are refused until the window ends, without checking the password.

use redis::AsyncCommands;

use super::{Sso, secs};

/// The two counters of one attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    account: String,
    address: String,
}

impl Sso {
    pub fn attempt(&self, tenant_id: i64, username: &str, address: &str) -> Attempt {
        Attempt {
            account: self.key(&format!(
                "fail:acct:{tenant_id}:{}",
                username.to_lowercase()
            )),
            address: self.key(&format!("fail:addr:{address}")),
        }
    }

    /// `Some(seconds to wait)` when the attempt is throttled.
    pub async fn throttled(&self, a: &Attempt) -> Result<Option<i64>, redis::RedisError> {
        let mut conn = self.redis();
        let (acct, addr): (Option<i64>, Option<i64>) = redis::pipe()
            .get(&a.account)
            .get(&a.address)
            .query_async(&mut conn)
            .await?;
        let s = self.settings();
        let over = |n: Option<i64>, max: i64| n.is_some_and(|n| n >= max);
        let key = if over(acct, s.account_failures) {
            &a.account
        } else if over(addr, s.address_failures) {
            &a.address
        } else {
            return Ok(None);
        };
        let ttl: i64 = conn.ttl(key).await?;
        Ok(Some(ttl.max(1)))
    }

    /// Counts a failed attempt.
    pub async fn failed(&self, a: &Attempt) -> Result<(), redis::RedisError> {
        let window = secs(self.settings().failure_window);
        let mut conn = self.redis();
        redis::pipe()
            .incr(&a.account, 1)
            .cmd("EXPIRE")
            .arg(&a.account)
            .arg(window)
            .arg("NX")
            .incr(&a.address, 1)
            .cmd("EXPIRE")
            .arg(&a.address)
            .arg(window)
            .arg("NX")
            .query_async::<()>(&mut conn)
            .await
    }

    /// A successful sign-in clears the account's count (not the address's).
    pub async fn succeeded(&self, a: &Attempt) -> Result<(), redis::RedisError> {
        self.redis().del::<_, ()>(&a.account).await
    }
}
