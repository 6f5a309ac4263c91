package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// DNSProxy is where the kernel sends agents' DNS (see bpf/lib/dns.h).
type DNSProxy struct {
	// IP4 and IP6 are the proxy's listeners for IPv4 and IPv6 sockets, Port their port.
	IP4  netip.Addr
	IP6  netip.Addr
	Port uint16
	// Remote4 and Remote6 (either, both or none) are the proxy's listeners, at Port, for agents
	// in other network namespaces (pods): addresses of this network namespace they reach. An
	// agent's DNS to a resolver of a family without one is not sent to the proxy.
	Remote4, Remote6 netip.Addr
	// DenyDoT denies agents port 853 (DNS over TLS, which the proxy cannot read).
	DenyDoT bool
}

// SetDNSProxy sends the DNS of agents in this process's network namespace (and in others, when
// p has remote addresses) to p from now on.
func (k *Kernel) SetDNSProxy(p DNSProxy) error {
	if !p.IP4.Is4() || !p.IP6.Is6() || p.IP6.Is4In6() || p.Port == 0 {
		return fmt.Errorf("DNS proxy %v / %v port %d: want an IPv4 and an IPv6 address and a port", p.IP4, p.IP6, p.Port)
	}
	if p.Remote4.IsValid() && (!p.Remote4.Is4() || p.Remote4.IsUnspecified()) {
		return fmt.Errorf("DNS proxy remote address %v: want an IPv4 address", p.Remote4)
	}
	if p.Remote6.IsValid() && (!p.Remote6.Is6() || p.Remote6.Is4In6() || p.Remote6.IsUnspecified()) {
		return fmt.Errorf("DNS proxy remote address %v: want an IPv6 address", p.Remote6)
	}
	netns, err := netnsCookie()
	if err != nil {
		return err
	}
	return k.updateConfig("turning on the DNS proxy", func(c *bpfTetherConfigEntry) {
		ip4 := p.IP4.As4()
		c.DnsIp4 = binary.NativeEndian.Uint32(ip4[:]) // network order in memory
		c.DnsIp6 = p.IP6.As16()
		c.DnsPort = p.Port
		c.DnsNetns = netns
		c.DnsFlags = uint16(bpfTetherDnsFlagsTETHER_DNS_REDIRECT)
		c.DnsRemoteIp4, c.DnsRemoteIp6 = 0, [16]uint8{}
		if p.Remote4.IsValid() {
			r4 := p.Remote4.As4()
			c.DnsRemoteIp4 = binary.NativeEndian.Uint32(r4[:])
		}
		if p.Remote6.IsValid() {
			c.DnsRemoteIp6 = p.Remote6.As16()
		}
		if p.Remote4.IsValid() || p.Remote6.IsValid() {
			c.DnsFlags |= uint16(bpfTetherDnsFlagsTETHER_DNS_REMOTE)
		}
		if p.DenyDoT {
			c.DnsFlags |= uint16(bpfTetherDnsFlagsTETHER_DNS_DENY_DOT)
		}
	})
}

// DNSProxyPort is the port the kernel sends agents' DNS to now (0: none).
func (k *Kernel) DNSProxyPort() uint16 {
	var c bpfTetherConfigEntry
	if err := k.config.Lookup(uint32(0), &c); err != nil || c.DnsFlags&uint16(bpfTetherDnsFlagsTETHER_DNS_REDIRECT) == 0 {
		return 0
	}
	return c.DnsPort
}

// ClearDNSProxy stops sending agents' DNS to the proxy: it goes where the agent sends it, judged
// by the egress rules.
func (k *Kernel) ClearDNSProxy() error {
	return k.updateConfig("turning off the DNS proxy", func(c *bpfTetherConfigEntry) {
		c.DnsFlags, c.DnsPort, c.DnsIp4, c.DnsIp6, c.DnsNetns = 0, 0, 0, [16]uint8{}, 0
		c.DnsRemoteIp4, c.DnsRemoteIp6 = 0, [16]uint8{}
	})
}

// netnsCookie is the cookie of this process's network namespace, as bpf_get_netns_cookie gives
// a socket's.
func netnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("reading the network namespace cookie: %w", err)
	}
	defer unix.Close(fd)
	v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
	if err != nil {
		return 0, fmt.Errorf("reading the network namespace cookie (SO_NETNS_COOKIE, Linux 5.14+): %w", err)
	}
	return v, nil
}

// ErrNoDNSPeer: no socket of a live agent sent DNS to the proxy from that address.
var ErrNoDNSPeer = errors.New("no agent socket sent DNS from that address")

// DNSPeer says whose socket sent a query the proxy received from peer over proto (IPPROTO_UDP or
// IPPROTO_TCP), and which resolver that socket asked; ErrNoDNSPeer when no live agent's did.
func (k *Kernel) DNSPeer(peer netip.AddrPort, proto uint8) (dataplane.Slot, netip.AddrPort, error) {
	// As16 of an IPv4 address is its ::ffff:a.b.c.d form, the key's.
	key := bpfTetherDnsPeerKey{Addr: peer.Addr().Unmap().As16(), Port: peer.Port(), Proto: proto}
	var v bpfTetherDnsPeer
	if err := k.dnsPeers.Lookup(key, &v); err != nil {
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return 0, netip.AddrPort{}, ErrNoDNSPeer
		}
		return 0, netip.AddrPort{}, fmt.Errorf("reading the DNS peer %v: %w", peer, err)
	}
	slot := dataplane.Slot(v.Slot)
	if err := checkSlot(slot); err != nil {
		return 0, netip.AddrPort{}, ErrNoDNSPeer
	}
	st := k.slot(slot)
	st.mu.Lock()
	err := k.loadSlot(st, slot)
	born := st.born
	st.mu.Unlock()
	if err != nil {
		return 0, netip.AddrPort{}, err
	}
	if born == 0 || born != v.Born {
		return 0, netip.AddrPort{}, ErrNoDNSPeer // an agent that is gone
	}
	return slot, netip.AddrPortFrom(netip.AddrFrom16(v.DnsAddr).Unmap(), v.DnsPort), nil
}
