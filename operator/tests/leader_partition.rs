//! Leader election against the real kube-apiserver, with two candidates. The leader reaches the
//! apiserver through a TCP proxy this test can cut (a network partition); the standby reaches it
//! directly. The leader must stop acting before the standby may start: its term ends at its last
//! successful renewal plus the renew deadline, which is shorter than the lease the standby waits
//! out. (With the earlier timing, renew deadline = lease length and a 5 s renew period, the old
//! leader kept acting for seconds after the standby took over.)

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aigw_common::shutdown::Shutdown;
use aigw_operator::leader::{self, Elector, Term, Timing};
use aigw_testkit::{Testbed, scratch_namespace, unique_name};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy to `target` whose connections can all be cut at once (and new ones refused).
struct Partition {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Partition {
    async fn to(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let (c, l) = (cut.clone(), links.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if c.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                l.lock().unwrap().push(link);
            }
        });
        Self { addr, cut, links }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_stops_before_the_standby_takes_over() {
    let tb = Testbed::load().unwrap();
    let admin = tb.kube_client().await.unwrap();
    let ns = scratch_namespace(&admin, "leader").await.unwrap();
    let lease = unique_name("lease");
    let timing = Timing {
        lease: Duration::from_secs(4),
        renew_deadline: Duration::from_millis(2_500),
        retry: Duration::from_millis(400),
    };

    // The leader's client goes through the partition.
    let mut config = tb.kube_config().await.unwrap();
    let real = config.cluster_url.clone();
    let target: SocketAddr = format!(
        "{}:{}",
        real.host().unwrap(),
        real.port_u16().unwrap_or(443)
    )
    .parse()
    .unwrap();
    let partition = Partition::to(target).await;
    config.cluster_url = format!("https://{}", partition.addr).parse().unwrap();
    let leader_client = kube::Client::try_from(config).unwrap();

    let a = Elector::new(leader_client, &ns, &lease, "a", timing.lease);
    let a_term = Term::default();
    let a_stop = Shutdown::new();
    assert!(leader::acquire(&a, timing, &a_term, &a_stop).await);
    assert!(a_term.valid());
    tokio::spawn(leader::hold(
        a.clone(),
        timing,
        a_term.clone(),
        a_stop.clone(),
    ));
    let a_stopped: Arc<Mutex<Option<Instant>>> = Arc::default();
    {
        let (stop, at) = (a_stop.clone(), a_stopped.clone());
        tokio::spawn(async move {
            stop.wait().await;
            *at.lock().unwrap() = Some(Instant::now());
        });
    }
    // A term that is no longer valid counts as stopped too (the reconcilers check it first).
    let a_quiet: Arc<Mutex<Option<Instant>>> = Arc::default();
    {
        let (term, at) = (a_term.clone(), a_quiet.clone());
        tokio::spawn(async move {
            while term.valid() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            *at.lock().unwrap() = Some(Instant::now());
        });
    }

    let b = Elector::new(admin.clone(), &ns, &lease, "b", timing.lease);
    let b_term = Term::default();
    let b_stop = Shutdown::new();
    let standby = {
        let (b, term, stop) = (b.clone(), b_term.clone(), b_stop.clone());
        tokio::spawn(async move {
            let won = leader::acquire(&b, timing, &term, &stop).await;
            (won, Instant::now())
        })
    };
    // The standby must not win while the leader renews.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !standby.is_finished(),
        "the standby took a lease that was being renewed"
    );
    assert!(a_term.valid());

    let cut_at = Instant::now();
    partition.cut();
    let (won, b_at) = tokio::time::timeout(Duration::from_secs(20), standby)
        .await
        .expect("the standby never took over")
        .unwrap();
    assert!(won);
    let quiet_at = a_quiet
        .lock()
        .unwrap()
        .expect("the leader's term never ended");
    assert!(
        quiet_at < b_at,
        "the old leader's term ended {:?} after the cut, the standby started {:?} after it",
        quiet_at - cut_at,
        b_at - cut_at
    );
    // And the old leader shuts itself down (its supervisor restarts it as a candidate).
    tokio::time::sleep(timing.retry * 3).await;
    let stopped_at = a_stopped
        .lock()
        .unwrap()
        .expect("the old leader did not stop");
    assert!(stopped_at - cut_at <= timing.renew_deadline + timing.retry * 3);
    assert!(b_term.valid());
    b_stop.trigger();
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(admin)
        .delete(&ns, &kube::api::DeleteParams::default())
        .await
        .unwrap();
}
