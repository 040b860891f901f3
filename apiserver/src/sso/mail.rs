//! Outgoing mail (invitations): a pluggable sender. `Smtp` delivers through an SMTP relay with
//! `lettre` (STARTTLS unless the relay is on loopback); `Log` writes each message as an `.eml`
//! file into a directory and logs its text, for `make dev` and the tests.

use std::path::PathBuf;

use lettre::{
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor, message::header::ContentType,
};

/// Where mail goes.
#[derive(Debug, Clone)]
pub enum Mailer {
    /// Logged, and written to `<dir>/<unix ms>-<to>.eml` when a directory is set.
    Log { dir: Option<PathBuf>, from: String },
    /// Sent through an SMTP relay.
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: String,
    },
}

impl Mailer {
    /// `log`, `log:<dir>`, or `smtp://host:port` / `smtps://…` (lettre's URL form, with
    /// credentials if needed); `from` is the sender address.
    pub fn from_url(url: &str, from: &str) -> Result<Self, String> {
        if url == "log" {
            return Ok(Mailer::Log {
                dir: None,
                from: from.to_owned(),
            });
        }
        if let Some(dir) = url.strip_prefix("log:") {
            std::fs::create_dir_all(dir).map_err(|e| format!("{dir}: {e}"))?;
            return Ok(Mailer::Log {
                dir: Some(PathBuf::from(dir)),
                from: from.to_owned(),
            });
        }
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| format!("mail URL {url:?}: {e}"))?
            .build();
        Ok(Mailer::Smtp {
            transport,
            from: from.to_owned(),
        })
    }

    fn from(&self) -> &str {
        match self {
            Mailer::Log { from, .. } | Mailer::Smtp { from, .. } => from,
        }
    }

    /// Sends a plain-text message.
    pub async fn send(&self, to: &str, subject: &str, body: &str) -> Result<(), String> {
        let message = Message::builder()
            .from(
                self.from()
                    .parse()
                    .map_err(|e| format!("sender {:?}: {e}", self.from()))?,
            )
            .to(to.parse().map_err(|e| format!("recipient {to:?}: {e}"))?)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body.to_owned())
            .map_err(|e| e.to_string())?;
        match self {
            Mailer::Log { dir, .. } => {
                tracing::info!(to, subject, body, "mail (log sender)");
                if let Some(dir) = dir {
                    let ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis());
                    let safe: String = to
                        .chars()
                        .map(|c| {
                            if c.is_ascii_alphanumeric() || c == '@' || c == '.' {
                                c
                            } else {
                                '_'
                            }
                        })
                        .collect();
                    let path = dir.join(format!("{ms}-{safe}.eml"));
                    tokio::fs::write(&path, message.formatted())
                        .await
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
                Ok(())
            }
            Mailer::Smtp { transport, .. } => transport
                .send(message)
                .await
                .map(|_| ())
                .map_err(|e| format!("SMTP: {e}")),
        }
    }
}

/// Mails the invitation `inv`; the link is `<issuer>/invite?token=…`, returned too.
pub async fn send_invitation(
    mailer: &Mailer,
    issuer: &str,
    display_name: &str,
    inv: &super::store::Invitation,
    token: &str,
    ttl: std::time::Duration,
) -> Result<String, String> {
    let query = serde_urlencoded::to_string([("token", token)]).map_err(|e| e.to_string())?;
    let link = format!("{issuer}/invite?{query}");
    let hours = ttl.as_secs() / 3600;
    let roles: Vec<&str> = inv.roles.iter().map(|r| r.as_str()).collect();
    let body = format!(
        "You are invited to {display_name} as {} ({}).\n\nSet your password here (the link works once, for {hours} hours):\n{link}\n",
        inv.username,
        roles.join(", "),
    );
    mailer
        .send(
            &inv.email,
            &format!("Your invitation to {display_name}"),
            &body,
        )
        .await?;
    Ok(link)
}
