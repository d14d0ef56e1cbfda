"""Host networking: namespace, bridges, TAPs, forwarding and the nftables table."""
