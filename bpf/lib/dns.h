/* Agents' DNS through tetherd's DNS proxy: the connect and sendmsg hooks send an agent's DNS
 * (port 53, UDP or TCP, to any address) to the proxy's listener instead, the recvmsg and
 * getpeername hooks give the agent back the resolver it asked, and the egress program tells the
 * proxy whose each query is (tether_dns_peers). The proxy decides by name. */

#ifndef TETHER_LIB_DNS_H
#define TETHER_LIB_DNS_H

/* tether_dns_config is tether_config when the proxy is on and the socket of ctx is in tetherd's
 * network namespace (a proxy on loopback is reachable from there only), else NULL. */
static __always_inline struct tether_config_entry *tether_dns_config(struct bpf_sock_addr *ctx)
{
	__u32 zero = 0;
	struct tether_config_entry *cfg = bpf_map_lookup_elem(&tether_config, &zero);
	if (!cfg || !(cfg->dns_flags & TETHER_DNS_REDIRECT))
		return NULL;
	if (bpf_get_netns_cookie(ctx) != cfg->dns_netns)
		return NULL;
	return cfg;
}

/* tether_dns_wanted sets d->dns for a connect or datagram of ctx (to port 53 or 853) that the
 * proxy takes (DNS) or that is denied while it is on (DNS over TLS, if configured), and returns
 * the configuration that says where the proxy is (NULL: it is off, or not for this socket). */
static __always_inline struct tether_config_entry *tether_dns_wanted(struct bpf_sock_addr *ctx, struct tether_decision *d)
{
	if (d->proto != IPPROTO_UDP && d->proto != IPPROTO_TCP)
		return NULL;
	struct tether_config_entry *cfg = tether_dns_config(ctx);
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
 * (to the proxy, or anywhere: an audit-mode agent whose rule set expired), at the proxy, and keeps
 * the resolver it was for in the socket's storage. */
static __always_inline void tether_dns_redirect(struct bpf_sock_addr *ctx, struct tether_decision *d,
						struct tether_config_entry *cfg, int v6)
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
	__u32 *a = (__u32 *)d->addr;
	int mapped = a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
	if (!v6) {
		ctx->user_ip4 = cfg->dns_ip4;
	} else if (mapped) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = cfg->dns_ip4;
	} else {
		__u32 ip6[4];
		__builtin_memcpy(ip6, cfg->dns_ip6, 16);
		ctx->user_ip6[0] = ip6[0];
		ctx->user_ip6[1] = ip6[1];
		ctx->user_ip6[2] = ip6[2];
		ctx->user_ip6[3] = ip6[3];
	}
	ctx->user_port = bpf_htons(cfg->dns_port);
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
		if (ctx->user_ip4 != cfg->dns_ip4)
			return;
		ctx->user_ip4 = orig[3];
	} else {
		__u32 ip6[4];
		__builtin_memcpy(ip6, cfg->dns_ip6, 16);
		int proxy4 = ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 && ctx->user_ip6[2] == bpf_htonl(0xffff) &&
			     ctx->user_ip6[3] == cfg->dns_ip4;
		int proxy6 = ctx->user_ip6[0] == ip6[0] && ctx->user_ip6[1] == ip6[1] && ctx->user_ip6[2] == ip6[2] &&
			     ctx->user_ip6[3] == ip6[3];
		if (!proxy4 && !proxy6)
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
	struct tether_config_entry *cfg = tether_dns_wanted(ctx, d);
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
	tether_dns_redirect(ctx, d, cfg, v6);
	return ok;
}

#endif /* TETHER_LIB_DNS_H */
