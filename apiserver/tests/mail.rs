//! The SMTP sender against a real SMTP server: Python's standard-library `smtpd`
//! (`DebuggingServer`, which prints every message it accepts), on a local port. The invitation
//! must arrive whole: sender, recipient, subject, the link.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aigw_apiserver::sso::{
    Role,
    mail::{Mailer, send_invitation},
    store::Invitation,
};

#[tokio::test]
async fn an_invitation_is_delivered_over_smtp() {
    let addr = aigw_testkit::process::free_addr().unwrap();
    let mut server = Command::new("python3")
        .args([
            "-W",
            "ignore",
            "-u",
            "-m",
            "smtpd",
            "-n",
            "-c",
            "DebuggingServer",
        ])
        .arg(addr.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the SMTP server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mailer = Mailer::from_url(
        &format!("smtp://{addr}"),
        "AIGateway <noreply@aigateway.local>",
    )
    .unwrap();
    let invitation = Invitation {
        tenant_id: 1,
        email: "liz@example.com".into(),
        username: "liz".into(),
        roles: vec![Role::Finance],
        sales_id: None,
    };
    let link = send_invitation(
        &mailer,
        "https://api.acme.example/oauth",
        "Acme AI",
        &invitation,
        "the-link-secret",
        Duration::from_hours(72),
    )
    .await
    .unwrap();
    assert_eq!(
        link,
        "https://api.acme.example/oauth/invite?token=the-link-secret"
    );
    // An address nobody can parse is refused before anything is sent.
    let bad = Invitation {
        email: "not an address".into(),
        ..invitation.clone()
    };
    assert!(
        send_invitation(
            &mailer,
            "https://x/oauth",
            "Acme AI",
            &bad,
            "t",
            Duration::from_hours(1)
        )
        .await
        .unwrap_err()
        .contains("recipient")
    );
    std::thread::sleep(Duration::from_millis(300));
    server.kill().unwrap();
    let mut printed = String::new();
    server
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
    server.wait().unwrap();
    for expected in [
        "From: AIGateway <noreply@aigateway.local>",
        "To: liz@example.com",
        "Subject: Your invitation to Acme AI",
        "You are invited to Acme AI as liz (finance).",
        "https://api.acme.example/oauth/invite?token=the-link-secret",
    ] {
        assert!(
            printed.contains(expected),
            "{expected:?} not in:\n{printed}"
        );
    }
}
