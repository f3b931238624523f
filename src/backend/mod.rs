//! Firewall backends. The nftables backend is native (netlink); the legacy iptables backend is
//! a later addition behind the same pipeline.
pub mod nft;
