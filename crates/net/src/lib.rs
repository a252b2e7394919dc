//! Skiff's managed bridge: subnet choice, taps, dnsmasq (DHCP and DNS) and nftables NAT
