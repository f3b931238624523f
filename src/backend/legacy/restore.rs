//! The `iptables-legacy-restore --noflush` payloads: the [`Payload`] builder (one method per
//! line kind: masqd's chain, its jump, the removal of default rules, the replay of records),
//! teardown, the replay of recorded default rules, and applying a payload through a
//! [`Runner`].

use anyhow::Context;
use ipnet::IpNet;

use super::observe::LegacyObserved;
use super::plan::match_default;
use super::runner::{Binaries, Runner};
use super::save::{quote_rule, same_rules};
use super::{CHAIN, JUMP};
use crate::exec::ExecError;
use crate::policy::Family;
use crate::state::RemovedRule;

/// An `iptables-legacy-restore --noflush` payload for the nat table: header comments, `*nat`,
/// the lines, `COMMIT`.
#[derive(Debug, Clone)]
pub struct Payload {
    lines: Vec<String>,
    header: usize,
}

impl Payload {
    /// An empty payload for the nat table (`*nat`).
    pub fn nat() -> Payload {
        Payload::with_comments(&[])
    }

    /// An empty payload for the nat table after comment lines (each written `# <line>`).
    pub fn with_comments(comments: &[String]) -> Payload {
        let mut lines: Vec<String> = comments.iter().map(|c| format!("# {c}")).collect();
        lines.push("*nat".into());
        let header = lines.len();
        Payload { lines, header }
    }

    /// Whether no line was added after `*nat`.
    pub fn is_empty(&self) -> bool {
        self.lines.len() == self.header
    }

    /// How many lines were added after `*nat`.
    pub fn len(&self) -> usize {
        self.lines.len() - self.header
    }

    /// `:MASQD-POSTROUTING - [0:0]`: with `--noflush`, equals `iptables -t nat -N
    /// MASQD-POSTROUTING` when the chain is missing and `iptables -t nat -F MASQD-POSTROUTING`
    /// when it exists.
    pub fn declare_chain(&mut self) {
        self.lines.push(format!(":{CHAIN} - [0:0]"));
    }

    /// `n` times `-D POSTROUTING <jump>`. Equals `iptables -t nat -D POSTROUTING -m comment
    /// --comment masqd -j MASQD-POSTROUTING`, `n` times.
    pub fn delete_jumps(&mut self, n: usize) {
        for _ in 0..n {
            self.lines.push(format!("-D POSTROUTING {JUMP}"));
        }
    }

    /// `-I POSTROUTING 1 <jump>`. Equals `iptables -t nat -I POSTROUTING 1 -m comment --comment
    /// masqd -j MASQD-POSTROUTING`.
    pub fn insert_jump(&mut self) {
        self.lines.push(format!("-I POSTROUTING 1 {JUMP}"));
    }

    /// `-D POSTROUTING <spec>`, the foreign spec in restore's quoting ([`quote_rule`]; the
    /// planner keeps only defaults it can quote). Equals `iptables -t nat -D POSTROUTING <spec>`.
    pub fn delete_default(&mut self, spec: &str) {
        self.lines.push(format!(
            "-D POSTROUTING {}",
            quote_rule(spec).unwrap_or_else(|| spec.to_string())
        ));
    }

    /// `-A MASQD-POSTROUTING <rule>` per rule. Equals `iptables -t nat -A MASQD-POSTROUTING
    /// <rule>` each.
    pub fn fill_chain(&mut self, rules: &[String]) {
        for r in rules {
            self.lines.push(format!("-A {CHAIN} {r}"));
        }
    }

    /// `-A POSTROUTING <rule>`, the rule already in restore's quoting. Equals `iptables -t nat
    /// -A POSTROUTING <rule>`.
    pub fn append_postrouting(&mut self, quoted: &str) {
        self.lines.push(format!("-A POSTROUTING {quoted}"));
    }

    /// `-F` and `-X MASQD-POSTROUTING`. Equals `iptables -t nat -F MASQD-POSTROUTING` then
    /// `iptables -t nat -X MASQD-POSTROUTING`.
    pub fn remove_chain(&mut self) {
        self.lines.push(format!("-F {CHAIN}"));
        self.lines.push(format!("-X {CHAIN}"));
    }

    /// The text, `COMMIT` last, each line ending in a newline.
    pub fn commit(mut self) -> String {
        self.lines.push("COMMIT".into());
        self.lines.join("\n") + "\n"
    }
}

/// Applies a payload atomically. Equals `iptables-legacy-restore --noflush --wait < payload`.
pub fn apply(bins: &Binaries, payload: &str) -> Result<(), ExecError> {
    bins.restore_noflush(payload)
}

/// [`apply`] through any [`Runner`]; a failure carries the payload in its context. Equals
/// `iptables-legacy-restore --noflush --wait < payload`.
pub fn apply_with(r: &dyn Runner, f: Family, payload: &str) -> anyhow::Result<()> {
    r.restore(f, payload)
        .with_context(|| format!("{} --noflush --wait of:\n{payload}", f.ipt_binaries().1))
}

/// The record of a removed legacy default rule.
pub fn record_of(f: Family, spec: &str, saddr: &IpNet, oif: &Option<String>) -> RemovedRule {
    RemovedRule {
        backend: "legacy".into(),
        family: f.nft_keyword().into(),
        table: "nat".into(),
        chain: "POSTROUTING".into(),
        description: format!("-A POSTROUTING {spec}"),
        saddr: saddr.to_string(),
        oif_neq: oif.clone(),
        expressions_hex: String::new(),
        userdata_hex: None,
        legacy_rule: Some(spec.to_string()),
    }
}

/// Checks that a record may be replayed: a legacy record of `nat POSTROUTING` whose rule still
/// reads as the broad default rule ([`match_default`]) for the record's source CIDR and
/// interface, and can be written in restore's notation. Returns the family and the rule in
/// iptables-restore's notation ([`quote_rule`]), or why not.
pub fn replayable(rec: &RemovedRule) -> Result<(Family, String), String> {
    let f = rec
        .family
        .known()
        .ok_or_else(|| format!("unknown family {:?}", rec.family.as_str()))?;
    if rec.backend.known() != Some(crate::backend::Backend::Legacy)
        || rec.table != "nat"
        || rec.chain != "POSTROUTING"
    {
        return Err(format!(
            "not a rule of legacy nat POSTROUTING ({} {} {})",
            rec.backend, rec.table, rec.chain
        ));
    }
    let spec = rec.legacy_rule.as_deref().ok_or("no legacy_rule")?;
    let saddr: IpNet = rec
        .saddr
        .parse()
        .map_err(|_| format!("saddr {:?} is not a CIDR", rec.saddr))?;
    match match_default(spec) {
        Some((s, oif)) if s == saddr && oif == rec.oif_neq => {}
        Some((s, _)) => {
            return Err(format!(
                "the rule is a masquerade rule for {s}, not {saddr}"
            ))
        }
        None => return Err("the rule is not a broad masquerade rule".into()),
    }
    let quoted = quote_rule(spec).ok_or("the rule cannot be written for iptables-restore")?;
    Ok((f, quoted))
}

/// The payload that puts recorded default rules back at the end of POSTROUTING (unless the
/// same rule is present), leaving masqd's chain and jump in place; with the number of rules it
/// adds. Records that fail [`replayable`] are skipped (the caller refuses them first). Equals
/// `iptables-legacy-restore --noflush` of `-A POSTROUTING <rule>` per record.
pub fn restore_payload(o: &LegacyObserved, records: &[&RemovedRule]) -> (Option<String>, usize) {
    let mut p = Payload::nat();
    for rec in records {
        let (Ok((_, quoted)), Some(spec)) = (replayable(rec), &rec.legacy_rule) else {
            continue;
        };
        let present = o
            .postrouting
            .iter()
            .any(|r| same_rules(std::slice::from_ref(r), std::slice::from_ref(spec)));
        if !present {
            p.append_postrouting(&quoted);
        }
    }
    let n = p.len();
    if n == 0 {
        return (None, 0);
    }
    (Some(p.commit()), n)
}

/// The payload that removes masqd's jump and chain, or None when there are none. Equals
/// `iptables-legacy-restore --noflush` of `-D POSTROUTING <jump>`, `-F` and `-X MASQD-POSTROUTING`.
pub fn teardown_payload(o: &LegacyObserved) -> Option<String> {
    let mut p = Payload::nat();
    p.delete_jumps(o.postrouting.iter().filter(|r| *r == JUMP).count());
    if o.chain_exists {
        p.remove_chain();
    }
    if p.is_empty() {
        return None;
    }
    Some(p.commit())
}

#[cfg(test)]
mod tests {
    use super::super::captured::{SAVE_V4, SAVE_V6};
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn every_payload_line_reads_as_iptables_restore_expects() {
        let mut p = Payload::with_comments(&["masqd".to_string(), "note".to_string()]);
        assert!(p.is_empty());
        p.declare_chain();
        p.delete_jumps(2);
        p.insert_jump();
        p.delete_default(r#"-s 172.7.21.0/24 ! -o a"b -j MASQUERADE"#);
        p.fill_chain(&["-o docker0 -j RETURN".to_string()]);
        p.append_postrouting("-s 10.0.0.0/8 -j MASQUERADE");
        p.remove_chain();
        assert_eq!(p.len(), 9);
        assert_eq!(
            p.commit(),
            "# masqd\n# note\n*nat\n\
             :MASQD-POSTROUTING - [0:0]\n\
             -D POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING\n\
             -D POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING\n\
             -I POSTROUTING 1 -m comment --comment masqd -j MASQD-POSTROUTING\n\
             -D POSTROUTING -s 172.7.21.0/24 ! -o \"a\\\"b\" -j MASQUERADE\n\
             -A MASQD-POSTROUTING -o docker0 -j RETURN\n\
             -A POSTROUTING -s 10.0.0.0/8 -j MASQUERADE\n\
             -F MASQD-POSTROUTING\n-X MASQD-POSTROUTING\n\
             COMMIT\n"
        );
        assert_eq!(Payload::nat().commit(), "*nat\nCOMMIT\n");
    }

    #[test]
    fn teardown_of_the_captured_table_removes_every_jump_and_the_chain() {
        let o = LegacyObserved::from_save(SAVE_V4);
        assert_eq!(
            teardown_payload(&o).as_deref(),
            Some(
                "*nat\n-D POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING\n\
                 -F MASQD-POSTROUTING\n-X MASQD-POSTROUTING\nCOMMIT\n"
            )
        );
        // A jump left without its chain (or twice) is still removed, each time.
        let mut o = LegacyObserved::from_save(SAVE_V6);
        o.postrouting = vec![JUMP.into(), "-j RETURN".into(), JUMP.into()];
        assert_eq!(
            teardown_payload(&o).as_deref(),
            Some(
                "*nat\n-D POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING\n\
                 -D POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING\nCOMMIT\n"
            )
        );
        assert_eq!(teardown_payload(&LegacyObserved::from_save(SAVE_V6)), None);
    }

    #[test]
    fn replay_writes_the_recorded_rule_in_restore_quoting_unless_present() {
        let spec = r#"-s 172.7.21.0/24 ! -o a"b -j MASQUERADE"#;
        let rec = record_of(
            Family::V4,
            spec,
            &net("172.7.21.0/24"),
            &Some("a\"b".into()),
        );
        let o = LegacyObserved::from_save(SAVE_V6);
        assert_eq!(
            restore_payload(&o, &[&rec]),
            (
                Some(
                    "*nat\n-A POSTROUTING -s 172.7.21.0/24 ! -o \"a\\\"b\" -j MASQUERADE\nCOMMIT\n"
                        .into()
                ),
                1
            )
        );
        // Present already, in another notation of the same source: not added twice.
        let v6 = record_of(
            Family::V6,
            "-s fd00:7:21:0:0:0:0:0/64 ! -o docker0 -j MASQUERADE",
            &net("fd00:7:21::/64"),
            &Some("docker0".into()),
        );
        assert_eq!(restore_payload(&o, &[&v6]), (None, 0));
        // A record that fails the checks is skipped.
        let mut bad = rec.clone();
        bad.chain = "OUTPUT".into();
        assert_eq!(restore_payload(&o, &[&bad]), (None, 0));
    }

    #[test]
    fn records_carry_the_family_keyword_and_replay_into_that_family() {
        let spec = "-s fd00:7:21::/64 ! -o docker0 -j MASQUERADE";
        let rec = record_of(
            Family::V6,
            spec,
            &net("fd00:7:21::/64"),
            &Some("docker0".into()),
        );
        assert_eq!(
            (rec.backend.as_str(), rec.family.as_str()),
            ("legacy", "ip6")
        );
        assert_eq!(rec.description, format!("-A POSTROUTING {spec}"));
        assert_eq!(replayable(&rec), Ok((Family::V6, spec.to_string())));
        let v4 = record_of(
            Family::V4,
            "-s 10.1.0.0/16 -j MASQUERADE",
            &net("10.1.0.0/16"),
            &None,
        );
        assert_eq!(v4.family.known(), Some(Family::V4));
        assert_eq!(replayable(&v4).map(|(f, _)| f), Ok(Family::V4));
        let mut odd = rec.clone();
        odd.family = "inet".into();
        assert_eq!(replayable(&odd), Err("unknown family \"inet\"".to_string()));
        let mut nft = rec.clone();
        nft.backend = "nft".into();
        assert!(replayable(&nft)
            .unwrap_err()
            .starts_with("not a rule of legacy"));
        let mut interface = rec;
        interface.oif_neq = Some("cni0".into());
        assert!(replayable(&interface).is_err());
    }
}
