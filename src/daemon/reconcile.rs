//! The one call from the daemon into the engine: a reconcile on a blocking task over the nft
//! driver the daemon keeps (its socket's port id marks masqd's own notifications; its set cache
//! is carried from one reconcile to the next), with the notifications muted around large
//! commits, and the legacy detection facts kept while legacy xtables did not change.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::task::{JoinError, JoinHandle};

use super::triggers::Trigger;
use super::TARGET;
use crate::backend::{Driver, NftDriver};
use crate::config::Config;
use crate::engine::{self, LegacyFacts, Plan};
use crate::metrics::Metrics;
use crate::netlink::Socket;
use crate::policy::Policy;

/// What one reconcile works from.
pub(super) struct Inputs {
    pub trigger: Trigger,
    pub cfg: Arc<Config>,
    pub policy: Arc<Policy>,
    pub state_dir: PathBuf,
    /// Read everything: notifications were lost, the set cache is not trusted.
    pub full: bool,
    /// What the event stream says since the last reconcile started.
    pub follow: super::follow::Start,
    /// The event socket, muted around large commits.
    pub monitor_fd: RawFd,
    /// Where the other NAT rules (a dump of every rule) go, when they are read this time.
    pub overridden_to: Option<Arc<Metrics>>,
}

/// A reconcile that ended.
pub(super) struct Finished {
    pub trigger: Trigger,
    pub result: Result<Plan>,
    pub took: Duration,
}

/// What the reconcile task hands back: the driver (its socket and set cache), the legacy
/// detection facts, and the result.
pub(super) type Output = (NftDriver, LegacyFacts, Finished);

/// The nft driver (the apply socket and the set cache), lent to the reconcile task while it
/// runs.
pub(super) struct Reconciler {
    drv: Option<NftDriver>,
    /// The legacy detection facts of the last reconcile (lent to the running one).
    facts: LegacyFacts,
    own_pid: u32,
    job: Option<JoinHandle<Output>>,
}

/// Opens the apply socket: a driver with no set cache, and its port id.
fn open_driver(what: &'static str) -> Result<(NftDriver, u32)> {
    let mut drv = NftDriver::new(Socket::open().context(what)?, None).following();
    let pid = drv.socket().portid()?;
    Ok((drv, pid))
}

impl Reconciler {
    /// Opens the apply socket.
    pub fn open() -> Result<Reconciler> {
        let (drv, own_pid) = open_driver("opening the netlink socket")?;
        Ok(Reconciler {
            own_pid,
            drv: Some(drv),
            facts: None,
            job: None,
        })
    }

    /// The apply socket's port id: notifications that carry it are masqd's own.
    pub fn own_pid(&self) -> u32 {
        self.own_pid
    }

    /// A copy of the set cache while no reconcile runs (the control socket's answers).
    pub fn mirror(&self) -> Option<crate::backend::SetCache> {
        self.drv.as_ref().and_then(|d| d.cache().cloned())
    }

    /// Whether a reconcile can start (none runs).
    pub fn idle(&self) -> bool {
        self.job.is_none() && self.drv.is_some()
    }

    /// Starts a reconcile on a blocking task (`engine::apply_nft_cached`).
    pub fn start(&mut self, inp: Inputs) {
        let Some(mut drv) = self.drv.take() else {
            return;
        };
        if inp.full {
            drv.forget();
        }
        // Not trusted: someone else changed masqd's table or sets in a way the notifications
        // do not say (a generation match would prove nothing here): read them back.
        if inp.follow.trust_sets {
            drv.trust_sets(true);
        } else {
            drv.forget_sets();
        }
        match &inp.follow.deltas {
            Some(d) => drv.follow(d),
            None => drv.forget_counted(),
        }
        let mut facts = self
            .facts
            .take()
            .filter(|_| inp.trigger.keeps_legacy_facts());
        self.job = Some(tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            // Mute our own notifications around large commits (the kernel would build one
            // per element); a change by someone else in that window is caught by the
            // generation check and reported as `missed_events`.
            let mon_fd = inp.monitor_fd;
            let mute = move |quiet: bool| {
                if let Err(e) = Socket::set_membership(mon_fd, !quiet) {
                    tracing::warn!(target: TARGET, "{e}");
                }
            };
            let result = engine::apply_nft_cached(
                &mut drv,
                &inp.state_dir,
                inp.cfg.mode,
                &inp.policy,
                Some(&mute),
                &mut facts,
            );
            let took = t.elapsed();
            if let (Some(m), Ok(p)) = (&inp.overridden_to, &result) {
                m.refresh_overridden(p, &inp.policy, &mut drv);
            }
            let trigger = inp.trigger;
            (
                drv,
                facts,
                Finished {
                    trigger,
                    result,
                    took,
                },
            )
        }));
    }

    /// Waits for the running reconcile (never returns while none runs; cancel-safe).
    pub async fn wait(&mut self) -> Result<Output, JoinError> {
        match &mut self.job {
            Some(job) => {
                let r = job.await;
                self.job = None;
                r
            }
            None => std::future::pending().await,
        }
    }

    /// Takes the driver (socket and set cache) back from a reconcile that ended; `keep` says,
    /// given whether it succeeded, whether its cache may be used by the next one. The legacy
    /// detection facts are kept unless it failed or changed legacy xtables itself.
    pub fn finished(&mut self, out: Output, keep: impl FnOnce(bool) -> bool) -> Finished {
        let (mut drv, facts, f) = out;
        if !keep(f.result.is_ok()) {
            drv.forget();
        }
        let legacy_unchanged = f.result.as_ref().is_ok_and(|p| p.legacy_plans().is_empty());
        self.facts = facts.filter(|_| legacy_unchanged);
        self.drv = Some(drv);
        f
    }

    /// The dump requests the reconcile socket sent so far, by object (None while one runs):
    /// `rule` is every rule of a family, `chain_rules` one chain's, `set_element` a set's
    /// elements.
    pub fn dumps(&mut self) -> Option<[(&'static str, u64); 5]> {
        use rustables::sys;
        let s = self.drv.as_mut()?.socket();
        let (rules, chain_rules) = s.dumps(sys::NFT_MSG_GETRULE);
        let (el, el_filtered) = s.dumps(sys::NFT_MSG_GETSETELEM);
        let (t, tf) = s.dumps(sys::NFT_MSG_GETTABLE);
        let (c, cf) = s.dumps(sys::NFT_MSG_GETCHAIN);
        Some([
            ("table", t + tf),
            ("chain", c + cf),
            ("rule", rules),
            ("chain_rules", chain_rules),
            ("set_element", el + el_filtered),
        ])
    }

    /// Drops the set cache only: someone else changed masqd's sets while the reconcile ran.
    pub fn forget_sets(&mut self) {
        if let Some(d) = &mut self.drv {
            d.forget_sets();
        }
    }

    /// The reconcile task died (it panicked): a fresh socket, no cache.
    pub fn crashed(&mut self) -> Result<()> {
        let (drv, own_pid) = open_driver("reopening netlink")?;
        self.own_pid = own_pid;
        self.drv = Some(drv);
        self.facts = None;
        Ok(())
    }

    /// Stopping: lets an apply in flight finish (it is one transaction either way).
    pub async fn drain(self) {
        if let Some(job) = self.job {
            let _ = tokio::time::timeout(Duration::from_secs(10), job).await;
        }
    }
}
