package kernel

// The generated tether_bpfel.go and tether_bpfel.o are committed, so building needs no clang.
// `make generate` runs this with the pinned clang; CI regenerates and fails on drift.
//go:generate go tool bpf2go -cc ${BPF_CLANG} -strip ${BPF_STRIP} -cflags ${BPF_CFLAGS} -target bpfel -type tether_event -type tether_rule_key -type tether_rule_value -type tether_host_key -type tether_host_value -type tether_config_entry -type tether_limits -type tether_kind -type tether_verdict -type tether_reason -type tether_mode -type tether_agent_flags -type tether_counter -type tether_rule_kind -type tether_port_rule_flags -type tether_sock_flags -type tether_dns_peer_key -type tether_dns_peer -type tether_dns_flags -output-stem tether bpf ../../bpf/tether.c -- -I../../bpf
