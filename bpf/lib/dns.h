/* Agents' DNS through tetherd's DNS proxy: the connect and sendmsg hooks send an agent's DNS
 * (port 53, UDP or TCP, to any address) to the proxy's listener instead, the recvmsg and
 * getpeername hooks give the agent back the resolver it asked, and the egress program tells the
 * proxy whose each query is (tether_dns_peers). The proxy decides by name. */

#ifndef TETHER_LIB_DNS_H
#define TETHER_LIB_DNS_H

/* tether_is4 says whether addr (16 bytes) is an IPv4 address (::ffff:a.b.c.d). */
static __always_inline int tether_is4(const __u8 *addr)
{
	const __u32 *a = (const __u32 *)addr;
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

/* tether_dns_config is tether_config when the proxy takes DNS of the socket of ctx, to d->addr,
 * else NULL. A socket in tetherd's network namespace reaches the proxy on loopback (*remote =
 * 0); one in another (a pod) at the remote address of d->addr's family (*remote = 1), when one
 * is configured. */
static __always_inline struct tether_config_entry *tether_dns_config(struct bpf_sock_addr *ctx,
								     struct tether_decision *d, int *remote)
{
	__u32 zero = 0;
	struct tether_config_entry *cfg = bpf_map_lookup_elem(&tether_config, &zero);
	if (!cfg || !(cfg->dns_flags & TETHER_DNS_REDIRECT))
		return NULL;
	if (bpf_get_netns_cookie(ctx) == cfg->dns_netns) {
		*remote = 0;
		return cfg;
	}
	if (!(cfg->dns_flags & TETHER_DNS_REMOTE))
		return NULL;
	if (tether_is4(d->addr)) {
		if (!cfg->dns_remote_ip4)
			return NULL;
	} else {
		__u32 ip6[4];
		__builtin_memcpy(ip6, cfg->dns_remote_ip6, 16);
		if (!(ip6[0] | ip6[1] | ip6[2] | ip6[3]))
			return NULL;
	}
	*remote = 1;
	return cfg;
}

/* tether_dns_wanted sets d->dns for a connect or datagram of ctx (to port 53 or 853) that the
 * proxy takes (DNS) or that is denied while it is on (DNS over TLS, if configured), and returns
 * the configuration that says where the proxy is (NULL: it is off, or not for this socket), and
 * in *remote which of its addresses. */
static __always_inline struct tether_config_entry *tether_dns_wanted(struct bpf_sock_addr *ctx, struct tether_decision *d,
								     int *remote)
{
	if (d->proto != IPPROTO_UDP && d->proto != IPPROTO_TCP)
		return NULL;
	struct tether_config_entry *cfg = tether_dns_config(ctx, d, remote);
	if (!cfg)
		return NULL;
	if (d->dport == TETHER_DNS_PORT)
		d->dns = TETHER_DNS_REDIRECT;
	else if (cfg->dns_flags & TETHER_DNS_DENY_DOT)
		d->dns = TETHER_DNS_DENY_DOT;
	return cfg;
}

/* tether_dns_verdict decides d, DNS the proxy takes (allowed: the proxy decides by name) or DNS
 * over TLS (denied), by the agent's rule set rules (its generation and mode). */
static __always_inline void tether_dns_verdict(struct tether_decision *d, void *rules)
{
	if (d->dns == TETHER_DNS_REDIRECT) {
		struct tether_rule_value *h = tether_header(rules);
		if (h)
			d->generation = h->generation;
		d->verdict = TETHER_VERDICT_ALLOW;
		d->reason = TETHER_REASON_DNS_PROXY;
	} else {
		tether_no_match(d, rules, TETHER_REASON_DNS_OVER_TLS);
	}
}

/* tether_dns_redirect points the connect or datagram of ctx, DNS of an agent that d lets through
 * (to the proxy, or anywhere: an audit-mode agent whose rule set expired), at the proxy (its
 * remote address when remote), and keeps the resolver it was for in the socket's storage. */
static __always_inline void tether_dns_redirect(struct bpf_sock_addr *ctx, struct tether_decision *d,
						struct tether_config_entry *cfg, int v6, int remote)
{
	if (!cfg || d->dns != TETHER_DNS_REDIRECT || d->verdict == TETHER_VERDICT_DENY)
		return;
	if (d->slot == TETHER_NO_SLOT || !ctx->sk)
		return;
	struct tether_sock *s = bpf_sk_storage_get(&tether_socks, ctx->sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!s) {
		tether_count(TETHER_COUNTER_SOCK_STORAGE_ERRORS);
		return; /* not redirected: the resolver it asked is judged by the egress rules */
	}
	if (s->slot != d->slot || s->born != d->born) {
		/* New storage (a datagram socket: connect's tether_connected made it otherwise). */
		s->slot = d->slot;
		s->born = d->born;
	}
	s->flags |= TETHER_SOCK_DNS;
	__builtin_memcpy(s->dns_addr, d->addr, 16);
	s->dns_port = d->dport;
	__u32 ip4 = cfg->dns_ip4;
	__u32 ip6[4];
	if (remote) {
		ip4 = cfg->dns_remote_ip4;
		__builtin_memcpy(ip6, cfg->dns_remote_ip6, 16);
	} else {
		__builtin_memcpy(ip6, cfg->dns_ip6, 16);
	}
	if (!v6) {
		ctx->user_ip4 = ip4;
	} else {
		if (tether_is4(d->addr)) {
			ip6[0] = 0;
			ip6[1] = 0;
			ip6[2] = bpf_htonl(0xffff);
			ip6[3] = ip4;
		}
		/* One store per field: the verifier refuses a store the compiler merged from two
		 * branches (through a modified ctx pointer). */
		ctx->user_ip6[0] = ip6[0];
		ctx->user_ip6[1] = ip6[1];
		ctx->user_ip6[2] = ip6[2];
		ctx->user_ip6[3] = ip6[3];
	}
	ctx->user_port = bpf_htons(cfg->dns_port);
}

/* tether_dns_proxy6 says whether peer (an IPv6 socket's, maybe ::ffff:a.b.c.d) is one of the
 * proxy's addresses. */
static __always_inline int tether_dns_proxy6(struct tether_config_entry *cfg, __u32 peer[4])
{
	if (peer[0] == 0 && peer[1] == 0 && peer[2] == bpf_htonl(0xffff))
		return peer[3] && (peer[3] == cfg->dns_ip4 || peer[3] == cfg->dns_remote_ip4);
	__u32 ip6[4];
	__builtin_memcpy(ip6, cfg->dns_ip6, 16);
	if (peer[0] == ip6[0] && peer[1] == ip6[1] && peer[2] == ip6[2] && peer[3] == ip6[3])
		return 1;
	__builtin_memcpy(ip6, cfg->dns_remote_ip6, 16);
	return peer[0] == ip6[0] && peer[1] == ip6[1] && peer[2] == ip6[2] && peer[3] == ip6[3] &&
	       (ip6[0] | ip6[1] | ip6[2] | ip6[3]);
}

/* tether_dns_unredirect gives a datagram received from the proxy (recvmsg) or the peer name
 * (getpeername) of a socket whose DNS went to the proxy the address of the resolver the agent
 * asked: the agent never sees the proxy. */
static __always_inline void tether_dns_unredirect(struct bpf_sock_addr *ctx, int v6)
{
	if (!ctx->sk)
		return;
	struct tether_sock *s = bpf_sk_storage_get(&tether_socks, ctx->sk, 0, 0);
	if (!s || !(s->flags & TETHER_SOCK_DNS))
		return;
	__u32 zero = 0;
	struct tether_config_entry *cfg = bpf_map_lookup_elem(&tether_config, &zero);
	if (!cfg || bpf_ntohs((__u16)ctx->user_port) != cfg->dns_port)
		return;
	__u32 orig[4];
	__builtin_memcpy(orig, s->dns_addr, 16);
	if (!v6) {
		__u32 ip4 = ctx->user_ip4;
		if (!ip4 || (ip4 != cfg->dns_ip4 && ip4 != cfg->dns_remote_ip4))
			return;
		ctx->user_ip4 = orig[3];
	} else {
		__u32 peer[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};
		if (!tether_dns_proxy6(cfg, peer))
			return;
		ctx->user_ip6[0] = orig[0];
		ctx->user_ip6[1] = orig[1];
		ctx->user_ip6[2] = orig[2];
		ctx->user_ip6[3] = orig[3];
	}
	ctx->user_port = bpf_htons(s->dns_port);
}

/* tether_inet_dns decides a connect or datagram of ctx to port 53 or 853: the proxy's when it
 * takes it (then sent to it), else by the egress rules as any other. */
static __always_inline int tether_inet_dns(struct bpf_sock_addr *ctx, struct tether_decision *d, int v6)
{
	int remote = 0;
	struct tether_config_entry *cfg = tether_dns_wanted(ctx, d, &remote);
	void *rules = NULL;
	if (tether_begin_agent(d)) {
		if (!d->dns) {
			rules = tether_egress_rules(d, NULL, 1);
		} else {
			rules = tether_ruleset(d);
			if (rules)
				tether_dns_verdict(d, rules);
		}
	}
	int ok = tether_finish(d, rules);
	if (d->kind == TETHER_KIND_CONNECT4 || d->kind == TETHER_KIND_CONNECT6)
		tether_connected(ctx, d);
	tether_dns_redirect(ctx, d, cfg, v6, remote);
	return ok;
}

#endif /* TETHER_LIB_DNS_H */
