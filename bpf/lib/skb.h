/* Live sockets and their packets. */

#ifndef TETHER_LIB_SKB_H
#define TETHER_LIB_SKB_H

/* Live sockets and their packets.
 *
 * A verdict taken at connect must hold for as long as the connection lives. The connect hooks
 * record, in the socket's storage (tether_socks), the rule-set generation that allowed it; when
 * the agent's rule set changes, the daemon sweeps the agent's live sockets (the iter programs)
 * and terminates with bpf_sock_destroy those whose destination the new rule set no longer allows
 * (the peer sees a reset, the agent ECONNABORTED). Behind that, tether_egress_skb looks at every
 * packet an agent socket sends: it drops the packets of a killed agent and of a socket whose
 * destination is no longer allowed (checked once per socket per generation), and packets whose
 * IP options or routing header would take them elsewhere than they are addressed. On a kernel
 * without bpf_sock_destroy (before 6.5) the drops alone do the job. */

#define TETHER_ETH_P_IP 0x0800
#define TETHER_ETH_P_IPV6 0x86DD
#define TETHER_NH_HOPOPTS 0
#define TETHER_NH_ROUTING 43
#define TETHER_NH_FRAGMENT 44
#define TETHER_NH_AH 51
#define TETHER_NH_DSTOPTS 60
#define TETHER_TCP_RST 0x04
#define TETHER_TCP_SYN 0x02
#define TETHER_TCP_ACK 0x10

/* What tether_egress_skb reads of a packet. */
struct tether_pkt {
	__u8 daddr[16]; /* IPv6, or IPv4 as ::ffff:a.b.c.d */
	__u16 dport;	/* host order; 0 when the header was not read */
	__u8 proto;
	__u8 detour; /* IPv4 options or an IPv6 routing header */
	__u8 rst;    /* a TCP reset without payload: the way a terminated connection ends */
	__u8 syn;    /* a TCP SYN without ACK: the socket is connecting */
};

/* tether_pkt_l4 reads the ports and TCP flags of the transport header at off; left is how many
 * bytes of the packet follow the IP header(s) up to its end. */
static __always_inline void tether_pkt_l4(struct __sk_buff *skb, struct tether_pkt *p, __u32 off, __s32 left)
{
	__u8 h[14];

	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return;
	if (bpf_skb_load_bytes(skb, off, h, p->proto == IPPROTO_TCP ? 14 : 4))
		return;
	p->dport = (__u16)h[2] << 8 | h[3];
	if (p->proto != IPPROTO_TCP)
		return;
	__s32 payload = left - (__s32)(h[12] >> 4) * 4;
	__u8 flags = h[13];
	p->rst = (flags & TETHER_TCP_RST) && payload <= 0;
	p->syn = (flags & TETHER_TCP_SYN) && !(flags & TETHER_TCP_ACK);
}

/* tether_pkt_read reads the network header of an outgoing packet (skb->data is at it) and the
 * transport header. */
__attribute__((noinline)) int tether_pkt_read(struct __sk_buff *skb, struct tether_pkt *p)
{
	if (!p)
		return 0;
	if (skb->protocol == bpf_htons(TETHER_ETH_P_IP)) {
		__u8 h[20];
		if (bpf_skb_load_bytes(skb, 0, h, 20))
			return 0;
		__u32 ihl = (h[0] & 0x0f) * 4;
		p->proto = h[9];
		p->detour = ihl != 20;
		tether_addr4(p->daddr, *(__u32 *)&h[16]);
		__u16 frag = (__u16)h[6] << 8 | h[7];
		if (ihl >= 20 && !(frag & 0x1fff))
			tether_pkt_l4(skb, p, ihl, ((__s32)h[2] << 8 | h[3]) - (__s32)ihl);
		return 0;
	}
	if (skb->protocol != bpf_htons(TETHER_ETH_P_IPV6))
		return 0;
	__u8 h[40];
	if (bpf_skb_load_bytes(skb, 0, h, 40))
		return 0;
	__builtin_memcpy(p->daddr, &h[24], 16);
	__u8 nh = h[6];
	__u32 off = 40;
	int frag = 0;
	/* Extension headers: a routing header of any type sends the packet to its next segment
	 * instead of its destination. The offset is kept in a known range so that the verifier's
	 * paths through the loop meet again instead of multiplying. */
	for (int i = 0; i < 6; i++) {
		__u8 x[2];
		if (nh == IPPROTO_TCP || nh == IPPROTO_UDP)
			break;
		if (nh == TETHER_NH_ROUTING)
			p->detour = 1;
		else if (nh != TETHER_NH_HOPOPTS && nh != TETHER_NH_DSTOPTS && nh != TETHER_NH_FRAGMENT && nh != TETHER_NH_AH)
			break;
		if (bpf_skb_load_bytes(skb, off, x, 2))
			return 0;
		__u32 units = nh == TETHER_NH_FRAGMENT ? 0 : x[1];
		__u32 len = nh == TETHER_NH_AH ? (units + 2) << 2 : (units + 1) << 3;
		frag |= nh == TETHER_NH_FRAGMENT; /* not the first fragment, or not only: ports may be elsewhere */
		nh = x[0];
		off = (off + len) & 0x7ff;
		tether_barrier_var(off);
	}
	p->proto = nh;
	if (!frag)
		tether_pkt_l4(skb, p, off, ((__s32)h[4] << 8 | h[5]) - ((__s32)off - 40));
	return 0;
}

/* tether_pkt_read_dst reads the destination address of a packet (skb->data at its network
 * header). */
static __always_inline void tether_pkt_read_dst(struct __sk_buff *skb, struct tether_pkt *p)
{
	if (skb->protocol == bpf_htons(TETHER_ETH_P_IP)) {
		__u32 a;
		if (!bpf_skb_load_bytes(skb, 16, &a, 4))
			tether_addr4(p->daddr, a);
		return;
	}
	if (skb->protocol == bpf_htons(TETHER_ETH_P_IPV6))
		bpf_skb_load_bytes(skb, 24, p->daddr, 16);
}

/* tether_skb_slot finds the agent of the socket of skb from its cgroup: the nearest one bound of
 * the cgroup and its ancestors, walked from the root down (64 levels at most). Unlike the task
 * hooks, which look 16 levels up, it finds an agent however deep below it the socket was made:
 * such a socket got no connect past the hooks, and its agent's rules are the ones to judge it. One
 * walk from the root keeps the verifier's paths few: the cgroup's own level is not known first. */
static __always_inline int tether_skb_slot(struct __sk_buff *skb, __u64 *cgroup_id, __u32 *slot)
{
	__u64 own = bpf_skb_cgroup_id(skb);
	int found = 0;

	*cgroup_id = own;
	for (int l = 0; l < 64; l++) {
		__u64 id = bpf_skb_ancestor_cgroup_id(skb, l);
		if (!id)
			break;
		struct tether_binding *b = bpf_map_lookup_elem(&tether_cgroups, &id);
		if (b) {
			*slot = b->slot;
			found = 1;
		}
		if (id == own)
			break;
	}
	return found;
}

/* tether_dns_peer_note records, for the proxy, whose socket sent this packet of DNS: the packet's
 * source address and port, as the proxy will see them, to the agent and the resolver asked. */
static __always_inline void tether_dns_peer_note(struct __sk_buff *skb, struct bpf_sock *sk, struct tether_sock *s)
{
	struct tether_dns_peer_key k = {};
	if (skb->protocol == bpf_htons(TETHER_ETH_P_IP)) {
		__u32 a;
		if (bpf_skb_load_bytes(skb, 12, &a, 4))
			return;
		k.addr[10] = 0xff;
		k.addr[11] = 0xff;
		__builtin_memcpy(k.addr + 12, &a, 4);
	} else if (skb->protocol == bpf_htons(TETHER_ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, 8, k.addr, 16))
			return;
	} else {
		return;
	}
	k.port = (__u16)sk->src_port;
	k.proto = (__u8)sk->protocol;
	struct tether_dns_peer v = {};
	v.born = s->born;
	v.slot = s->slot;
	v.dns_port = s->dns_port;
	__builtin_memcpy(v.dns_addr, s->dns_addr, 16);
	struct tether_dns_peer *old = bpf_map_lookup_elem(&tether_dns_peers, &k);
	if (old && old->born == v.born && old->slot == v.slot && old->dns_port == v.dns_port)
		return; /* the same socket's packet, most likely: no write */
	bpf_map_update_elem(&tether_dns_peers, &k, &v, BPF_ANY);
}

/* tether_sock_current says whether socket storage s still belongs to the agent (or, for a socket
 * of no agent, to the bindings) it was attributed to; agent gets that agent. */
static __always_inline int tether_sock_current(struct tether_sock *s, struct tether_agent **agent)
{
	__u32 zero = 0;

	if (s->slot == TETHER_NO_SLOT) {
		struct tether_config_entry *cfg = bpf_map_lookup_elem(&tether_config, &zero);
		return cfg && s->born == cfg->bindings_gen;
	}
	__u32 slot = s->slot;
	*agent = bpf_map_lookup_elem(&tether_agents, &slot);
	return *agent && (*agent)->born == s->born;
}

/* tether_sock_attribute gives socket storage s (new, or of an agent that is gone) the agent slot
 * now has, and starts it unchecked. */
static __always_inline void tether_sock_attribute(struct tether_sock *s, __u32 slot, struct tether_agent **agent)
{
	__u32 zero = 0;

	s->slot = slot;
	s->generation = 0;
	s->flags &= TETHER_SOCK_OUTBOUND | TETHER_SOCK_DNS;
	s->born = 0;
	if (slot == TETHER_NO_SLOT) {
		struct tether_config_entry *cfg = bpf_map_lookup_elem(&tether_config, &zero);
		if (cfg)
			s->born = cfg->bindings_gen;
		return;
	}
	*agent = bpf_map_lookup_elem(&tether_agents, &slot);
	if (*agent)
		s->born = (*agent)->born;
}

/* tether_sock_event records a decision on a socket from a context that is not the socket's
 * process (a packet, a sweep): the process that connected it, and its lineage while it lives. */
__attribute__((noinline)) int tether_sock_event(struct tether_decision *d, struct tether_sock *s, __u32 uid)
{
	if (!d)
		return 0;
	tether_account(d);
	struct tether_event *e = bpf_ringbuf_reserve(&tether_events, sizeof(*e), 0);
	if (!e) {
		tether_count(TETHER_COUNTER_RINGBUF_DROPS);
		return 0;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_boot_ns = bpf_ktime_get_boot_ns();
	e->generation = d->generation;
	e->cgroup_id = d->cgroup_id;
	e->slot = d->slot;
	e->uid = uid;
	e->kind = d->kind;
	e->verdict = d->verdict;
	e->reason = d->reason;
	e->proto = d->proto;
	e->dport = d->dport;
	e->family = d->family;
	e->sock_type = d->proto == IPPROTO_TCP ? SOCK_STREAM : SOCK_DGRAM;
	__builtin_memcpy(e->daddr, d->addr, sizeof(e->daddr));
	if (!s) {
		tether_submit(e);
		return 0;
	}
	e->pid = s->pid;
	e->bin_dev = s->bin_dev;
	e->bin_ino = s->bin_ino;
	struct tether_proc *p = tether_event_lineage(e, !s->bin_ino);
	if (p)
		__builtin_memcpy(e->comm, p->comm, sizeof(e->comm));
	tether_submit(e);
	return 0;
}

/* tether_sock_expired turns the verdict on socket s, past its deadline, into a deny (a would-deny
 * in audit mode): max-duration, or revoked when the deadline was its counted grant's expiry. */
static __always_inline void tether_sock_expired(struct tether_decision *d, struct tether_sock *s)
{
	d->verdict = (s->flags & TETHER_SOCK_DEADLINE_AUDIT) ? TETHER_VERDICT_AUDIT : TETHER_VERDICT_DENY;
	d->reason = (s->flags & TETHER_SOCK_DEADLINE_GRANT) ? TETHER_REASON_REVOKED : TETHER_REASON_MAX_DURATION;
	s->flags |= TETHER_SOCK_EXPIRED;
}

/* tether_sock_check decides, once per rule-set generation, whether the agent's rule set in force
 * still allows the destination of socket s (d carries its slot, address, port and protocol), and
 * keeps the answer in s: verdict, and reason revoked (or max-duration) when it does not. It
 * returns 1 when the answer is new (the caller records it when it is not an allow). */
__attribute__((noinline)) int tether_sock_check(struct tether_decision *d, struct tether_sock *s)
{
	if (!d || !s)
		return 0;
	if (s->flags & TETHER_SOCK_DNS)
		d->dns = TETHER_DNS_REDIRECT; /* its destination is the proxy */
	__u32 slot = d->slot;
	struct tether_agent *agent = bpf_map_lookup_elem(&tether_agents, &slot);
	if (agent) {
		__u32 active = agent->active & 1;
		__u64 gen = agent->generation[active];
		__u32 state = agent->flags & (TETHER_AGENT_ACTIVE | TETHER_AGENT_KILLED);
		__u64 expires = agent->expires[active];
		int live = !expires || bpf_ktime_get_boot_ns() < expires;
		if (state == TETHER_AGENT_ACTIVE && s->generation == gen && (s->flags & TETHER_SOCK_CHECKED) && live) {
			if (s->flags & TETHER_SOCK_EXPIRY_REPORTED)
				s->flags &= ~TETHER_SOCK_EXPIRY_REPORTED; /* its expiry moved */
			d->generation = gen;
			d->verdict = s->verdict;
			d->reason = s->reason;
			if (s->deadline_ns && !(s->flags & TETHER_SOCK_EXPIRED) && bpf_ktime_get_boot_ns() >= s->deadline_ns) {
				tether_sock_expired(d, s);
				s->verdict = d->verdict;
				s->reason = d->reason;
				s->flags &= ~TETHER_SOCK_REPORTED;
				return 1;
			}
			return 0;
		}
	}
	d->recheck = 1;
	d->caller = TETHER_CALLER_NONE;
	if (s->bin_ino) {
		d->caller = TETHER_CALLER_KNOWN;
		d->caller_dev = s->bin_dev;
		d->caller_ino = s->bin_ino;
	} else {
		__u32 pid = s->pid;
		struct tether_proc *p = bpf_map_lookup_elem(&tether_procs, &pid);
		if (p) {
			d->caller = TETHER_CALLER_KNOWN;
			d->caller_dev = p->bin_dev;
			d->caller_ino = p->bin_ino;
		}
	}
	void *rules = tether_begin_slot(d, &slot);
	if (rules && d->dns)
		tether_dns_verdict(d, rules);
	else if (rules)
		tether_egress_rules(d, rules, 0);
	if (d->verdict != TETHER_VERDICT_ALLOW && d->reason != TETHER_REASON_KILLED && d->reason != TETHER_REASON_EXPIRED)
		d->reason = TETHER_REASON_REVOKED;
	s->deadline_ns = 0;
	if (d->verdict != TETHER_VERDICT_DENY) {
		tether_sock_deadline(d, s);
		if (s->deadline_ns && bpf_ktime_get_boot_ns() >= s->deadline_ns)
			tether_sock_expired(d, s);
	}
	if (d->reason != TETHER_REASON_KILLED && d->reason != TETHER_REASON_EXPIRED) {
		/* A killed agent's sockets are judged again when it is readmitted; an expired rule
		 * set's, when it is replaced or its expiry moved. */
		s->flags &= ~TETHER_SOCK_EXPIRY_REPORTED;
		s->generation = d->generation;
		s->verdict = d->verdict;
		s->reason = d->reason;
		s->flags |= TETHER_SOCK_CHECKED;
	}
	s->flags &= ~TETHER_SOCK_REPORTED;
	return 1;
}

/* tether_plain says, from the packet's first bytes, that it carries no IPv4 option and no IPv6
 * extension header (the common case: no detour possible). */
static __always_inline int tether_plain(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	__u8 *h = data;

	if (data + 40 > end)
		return 0;
	if (skb->protocol == bpf_htons(TETHER_ETH_P_IP))
		return h[0] == 0x45;
	if (skb->protocol == bpf_htons(TETHER_ETH_P_IPV6))
		return h[6] == IPPROTO_TCP || h[6] == IPPROTO_UDP;
	return 0;
}

/* tether_skb_unattributed decides a packet of a socket of no agent: only one its agent connected
 * and then lost (unregistered) is judged, as any connect of a cgroup of no agent. */
static __always_inline int tether_skb_unattributed(struct __sk_buff *skb, struct tether_sock *s, struct tether_pkt *p,
						   struct tether_decision *d)
{
	if (!s || !(s->flags & TETHER_SOCK_OUTBOUND) || tether_unknown_cgroup_allow || p->rst)
		return 1;
	d->verdict = TETHER_VERDICT_DENY;
	d->reason = TETHER_REASON_UNKNOWN_CGROUP;
	if (!(s->flags & TETHER_SOCK_REPORTED)) {
		s->flags |= TETHER_SOCK_REPORTED;
		tether_sock_event(d, s, bpf_get_socket_uid(skb));
	} else {
		tether_count(TETHER_COUNTER_UNKNOWN_CGROUP);
	}
	return 0;
}

/* tether_skb_detour decides a packet whose IP options or routing header would take it elsewhere
 * than it is addressed: dropped, or reported in audit mode; recorded once per socket. */
static __always_inline int tether_skb_detour(struct __sk_buff *skb, struct tether_sock *s, struct tether_agent *agent,
					     struct tether_decision *d)
{
	d->verdict = TETHER_VERDICT_DENY;
	d->reason = TETHER_REASON_DETOUR;
	if (agent) {
		__u32 active = agent->active & 1, buf = d->slot * 2 + active;
		d->generation = agent->generation[active];
		void *rules = bpf_map_lookup_elem(&tether_rulesets, &buf);
		struct tether_rule_value *h = rules ? tether_header(rules) : NULL;
		if (h && h->mode == TETHER_MODE_AUDIT && !(agent->flags & TETHER_AGENT_KILLED))
			d->verdict = TETHER_VERDICT_AUDIT;
	}
	if (!s || !(s->flags & TETHER_SOCK_DETOUR_REPORTED)) {
		if (s)
			s->flags |= TETHER_SOCK_DETOUR_REPORTED;
		tether_sock_event(d, s, bpf_get_socket_uid(skb));
	} else {
		tether_account(d);
	}
	return d->verdict != TETHER_VERDICT_DENY;
}

/* tether_skb_killed drops a packet of a killed agent (its resets go out); recorded once per
 * socket. */
static __always_inline int tether_skb_killed(struct __sk_buff *skb, struct tether_sock *s, struct tether_agent *agent,
					     struct tether_pkt *p, struct tether_decision *d)
{
	if (p->rst)
		return 1;
	d->verdict = TETHER_VERDICT_DENY;
	d->reason = TETHER_REASON_KILLED;
	d->generation = agent->generation[agent->active & 1];
	if (!s || !(s->flags & TETHER_SOCK_KILL_REPORTED)) {
		if (s)
			s->flags |= TETHER_SOCK_KILL_REPORTED;
		tether_sock_event(d, s, bpf_get_socket_uid(skb));
	} else {
		tether_account(d);
	}
	return 0;
}

/* tether_skb_recheck decides a packet of a live agent's socket: one it accepted or sends
 * unconnected datagrams on passes (sendmsg judged each datagram); one it connected is judged by
 * the socket's own destination, not the packet's, so one check stands for all its packets,
 * recorded when the answer is new. */
static __always_inline int tether_skb_recheck(struct __sk_buff *skb, struct bpf_sock *sk, struct tether_sock *s,
					      struct tether_pkt *p, struct tether_decision *d)
{
	if (s && (s->flags & TETHER_SOCK_KILL_REPORTED))
		s->flags &= ~TETHER_SOCK_KILL_REPORTED; /* readmitted */
	if (!s || !(s->flags & TETHER_SOCK_OUTBOUND))
		return 1;
	d->proto = sk->protocol;
	d->dport = bpf_ntohs(sk->dst_port);
	if (sk->family == AF_INET) {
		tether_addr4(d->addr, sk->dst_ip4);
	} else {
		__u32 *a = (__u32 *)d->addr;
		a[0] = sk->dst_ip6[0];
		a[1] = sk->dst_ip6[1];
		a[2] = sk->dst_ip6[2];
		a[3] = sk->dst_ip6[3];
	}
	if (sk->protocol == IPPROTO_UDP) {
		/* A datagram to another address than the socket's (sendto on a connected socket)
		 * was judged by sendmsg; one from a socket no longer connected too. */
		__u64 *x = (__u64 *)d->addr, *y = (__u64 *)p->daddr;
		if (sk->dst_port == 0 || d->dport != p->dport || x[0] != y[0] || x[1] != y[1])
			return 1;
	}
	int fresh_answer = tether_sock_check(d, s);
	if (d->verdict == TETHER_VERDICT_ALLOW)
		return 1;
	if (d->verdict == TETHER_VERDICT_DENY && p->rst)
		return 1;
	if (d->reason == TETHER_REASON_EXPIRED) {
		/* Not kept as the socket's answer (see tether_sock_check): recorded once per socket
		 * and expiry. */
		if (!(s->flags & TETHER_SOCK_EXPIRY_REPORTED)) {
			s->flags |= TETHER_SOCK_EXPIRY_REPORTED;
			tether_sock_event(d, s, bpf_get_socket_uid(skb));
		} else if (d->verdict == TETHER_VERDICT_DENY) {
			tether_account(d);
		}
		return d->verdict != TETHER_VERDICT_DENY;
	}
	if (fresh_answer || !(s->flags & TETHER_SOCK_REPORTED)) {
		s->flags |= TETHER_SOCK_REPORTED;
		tether_sock_event(d, s, bpf_get_socket_uid(skb));
	} else if (d->verdict == TETHER_VERDICT_DENY) {
		tether_account(d);
	}
	return d->verdict != TETHER_VERDICT_DENY;
}

#endif /* TETHER_LIB_SKB_H */
