//! Firewall backends: native nftables over netlink, and the legacy xtables fallback through
//! the iptables-legacy binaries. Which one a family uses is decided by [`crate::detect`].
pub mod legacy;
pub mod nft;
