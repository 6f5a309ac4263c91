/* The maps the daemon fills and the programs read, and the kernel functions they call. */

#ifndef TETHER_LIB_MAPS_H
#define TETHER_LIB_MAPS_H

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TETHER_MAX_CGROUPS);
	__type(key, __u64);
	__type(value, struct tether_binding);
} tether_cgroups SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TETHER_MAX_AGENTS);
	__type(key, __u32);
	__type(value, struct tether_agent);
} tether_agents SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tether_config_entry);
} tether_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct tether_slot_cache_entry);
} tether_slot_cache SEC(".maps");

#define TETHER_CACHE_MAGIC 0x7e7e3a5b1d2c4f60ULL

struct tether_rules {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, TETHER_MAX_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tether_rule_key);
	__type(value, struct tether_rule_value);
};

/* Types that Go needs but no map or program signature names (the inner map's key and value, the
 * event, the enums): this pointer keeps them whole in BTF for bpf2go -type. Nothing reads it. */
struct tether_btf_anchor {
	struct tether_rule_key rule_key;
	struct tether_rule_value rule_value;
	struct tether_host_key host_key;
	struct tether_host_value host_value;
	struct tether_event event;
	enum tether_limits limits;
	enum tether_rule_kind rule_kind;
	enum tether_kind kind;
	enum tether_verdict verdict;
	enum tether_reason reason;
	enum tether_mode mode;
	enum tether_agent_flags agent_flags;
	enum tether_port_rule_flags port_rule_flags;
	enum tether_counter counter;
	enum tether_sock_flags sock_flags;
	struct tether_config_entry config;
	struct tether_slot_cache_entry slot_cache;
	struct tether_dns_peer_key dns_peer_key;
	struct tether_dns_peer dns_peer;
	enum tether_dns_flags dns_flags;
};
const struct tether_btf_anchor *const tether_btf_anchor __attribute__((unused)) = 0;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, TETHER_RULESET_ENTRIES);
	__type(key, __u32);
	__array(values, struct tether_rules);
} tether_rulesets SEC(".maps");

/* Preallocated: an update takes a free element instead of allocating one (three times faster). A
 * freed element may be reused at once, so the daemon deletes or overwrites only entries of a
 * buffer that no hook can be reading (not in force, its grace period over). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TETHER_MAX_HOST_RULES);
	__type(key, struct tether_host_key);
	__type(value, struct tether_host_value);
} tether_hosts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TETHER_MAX_PROCS);
	__type(key, __u32);
	__type(value, struct tether_proc);
} tether_procs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, TETHER_MAX_ROOTS);
	__type(key, __u64); /* a container cgroup's ID */
	__type(value, struct tether_root);
} tether_roots SEC(".maps");

/* Written by the egress program for each packet of a socket whose DNS goes to the proxy (see
 * TETHER_SOCK_DNS); the proxy reads whose a query is from its peer address. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, TETHER_MAX_DNS_PEERS);
	__type(key, struct tether_dns_peer_key);
	__type(value, struct tether_dns_peer);
} tether_dns_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20); /* the daemon sets the size from its config */
} tether_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TETHER_COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} tether_counters SEC(".maps");

/* tether_settled[0]: records of tether_events that daemons have settled (written to their sinks,
 * or counted lost) since the pins were made. Only the daemon writes it: what a daemon read and
 * had not settled when it was killed is the difference to TETHER_COUNTER_EVENTS_SUBMITTED less
 * what the ring buffer still holds, which the next daemon counts lost. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} tether_settled SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TETHER_MAX_AGENTS);
	__type(key, __u32);
	__type(value, struct tether_agent_counts);
} tether_agent_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TETHER_MAX_AGENTS);
	__type(key, __u32);
	__type(value, struct tether_agent_allows);
} tether_agent_allows SEC(".maps");

/* Counted grants, by the index the daemon gives them; see struct tether_grant_uses. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TETHER_MAX_GRANTS);
	__type(key, __u32);
	__type(value, struct tether_grant_uses);
} tether_grant_uses SEC(".maps");

/* Written and read by the daemon only; see struct tether_agent_info. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TETHER_MAX_AGENTS);
	__type(key, __u32);
	__type(value, struct tether_agent_info);
} tether_agent_info SEC(".maps");

/* What the programs know of each socket of an agent (see struct tether_sock). Not cloned: a
 * socket an agent accepts starts without one, and is not judged by the egress rules. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct tether_sock);
} tether_socks SEC(".maps");

/* The slots a sweep of live sockets checks; see struct tether_sweep_slot. The entry after the
 * last slot describes the sweep: want says whether it also looks at sockets that have no storage
 * (it has a killed agent, whose listeners go too: that costs a walk of each such socket's
 * cgroups), checked in how many shards it runs (see tether_sweep_shard). */
#define TETHER_SWEEP_ALL TETHER_MAX_AGENTS
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TETHER_MAX_AGENTS + 1);
	__type(key, __u32);
	__type(value, struct tether_sweep_slot);
} tether_sweep SEC(".maps");

/* The shard of a sweep this CPU's reader takes (index + 1; 0: every socket). A sweep runs one
 * reader per CPU it may use, each pinned to its CPU and walking every socket, and each terminates
 * those whose cookie falls in its shard: the work of terminating (a reset sent, the peer's answer
 * handled) is spread over the CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} tether_sweep_shard SEC(".maps");

/* The agent parent cgroups, from index 0 to tether_config.parents - 1: the global programs ask
 * bpf_current_task_under_cgroup of these first, so that a process outside them costs a helper
 * call per parent and nothing else. */
struct {
	__uint(type, BPF_MAP_TYPE_CGROUP_ARRAY);
	__uint(max_entries, TETHER_MAX_PARENTS);
	__type(key, __u32);
	__type(value, __u32);
} tether_parents SEC(".maps");

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;
extern int bpf_sock_destroy(struct sock_common *sk) __ksym;
/* Linux 6.13+: signal another task than the current one (a process moved by another). */
extern int bpf_send_signal_task(struct task_struct *task, int sig, enum pid_type type, __u64 value) __ksym __weak;

#endif /* TETHER_LIB_MAPS_H */
