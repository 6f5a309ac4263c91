package privtest

import (
	"crypto/rand"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Host is a test host: a network namespace reached from the test's namespace over a veth pair.
// Traffic to it never leaves the machine.
type Host struct {
	ns        netns.NsHandle
	V4, V6    netip.Addr // the host's addresses
	Ours4     netip.Addr // our side of the veth pair
	Ours6     netip.Addr
	veth      netlink.Link
	peer      string // the name of the host's end of the veth pair, in its namespace
	closeOnce sync.Once
}

// NewHost creates a network namespace joined to the current one by a veth pair, with addresses
// in 198.18.0.0/15 (reserved for benchmarking) and in a random ULA /64. Removed at test end.
func NewHost(t testing.TB) *Host {
	t.Helper()
	h, err := StartHost()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// StartHost is NewHost outside a test: the caller calls Close.
func StartHost() (_ *Host, err error) {
	var r [4]byte
	rand.Read(r[:])
	// A /30 in 198.18.0.0/15: .1 on our side, .2 on the host.
	base := [4]byte{198, 18 | (r[0] & 1), r[1], r[2] &^ 3}
	h := &Host{
		Ours4: netip.AddrFrom4([4]byte{base[0], base[1], base[2], base[3] | 1}),
		V4:    netip.AddrFrom4([4]byte{base[0], base[1], base[2], base[3] | 2}),
	}
	v6 := [16]byte{0xfd, 0x74, 0x65, 0x74, r[0], r[1], r[2], r[3]}
	v6[15] = 1
	ours6 := netip.AddrFrom16(v6)
	h.Ours6 = ours6
	v6[15] = 2
	h.V6 = netip.AddrFrom16(v6)
	h.peer = fmt.Sprintf("tp%x", r)

	hostName := fmt.Sprintf("tt%x", r)
	peerName := h.peer

	runtime.LockOSThread()
	origin, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	ns, err := netns.New() // switches this thread into the new namespace
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("creating network namespace: %w", err)
	}
	if err := netns.Set(origin); err != nil {
		// Leave the thread locked: it dies with the goroutine instead of serving others.
		return nil, fmt.Errorf("returning to the original network namespace: %w", err)
	}
	runtime.UnlockOSThread()
	origin.Close()
	h.ns = ns
	defer func() {
		if err != nil {
			h.Close()
		}
	}()

	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostName}, PeerName: peerName, PeerNamespace: netlink.NsFd(int(ns))}
	if err := netlink.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("creating veth pair: %w", err)
	}
	h.veth = veth
	ours, err := netlink.LinkByName(hostName)
	if err != nil {
		return nil, err
	}
	if err := configure(netlink.Handle{}, ours, h.Ours4, 30, ours6); err != nil {
		return nil, err
	}
	in, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE) // only route: xfrm may be a module that is not loaded
	if err != nil {
		return nil, err
	}
	defer in.Close()
	lo, err := in.LinkByName("lo")
	if err != nil {
		return nil, err
	}
	if err := in.LinkSetUp(lo); err != nil {
		return nil, err
	}
	peer, err := in.LinkByName(peerName)
	if err != nil {
		return nil, err
	}
	return h, configure(*in, peer, h.V4, 30, h.V6)
}

// Close removes the namespace and the veth pair.
func (h *Host) Close() {
	h.closeOnce.Do(func() {
		if h.veth != nil {
			netlink.LinkDel(h.veth)
		}
		h.ns.Close() // the last reference: the namespace goes
	})
}

// NetNS returns the namespace's file descriptor (owned by h).
func (h *Host) NetNS() int { return int(h.ns) }

func configure(h netlink.Handle, l netlink.Link, v4 netip.Addr, bits4 int, v6 netip.Addr) error {
	a4 := &netlink.Addr{IPNet: &net.IPNet{IP: v4.AsSlice(), Mask: net.CIDRMask(bits4, 32)}}
	a6 := &netlink.Addr{IPNet: &net.IPNet{IP: v6.AsSlice(), Mask: net.CIDRMask(64, 128)}, Flags: unix.IFA_F_NODAD}
	for _, a := range []*netlink.Addr{a4, a6} {
		if err := h.AddrAdd(l, a); err != nil {
			return fmt.Errorf("adding %s: %w", a.IPNet, err)
		}
	}
	return h.LinkSetUp(l)
}

// In runs f with the calling goroutine's thread inside the host's namespace. Sockets f creates
// stay in that namespace.
func (h *Host) In(f func() error) error {
	return h.in(f)
}

// in runs f with the calling goroutine's thread inside the host's namespace. Sockets f creates
// stay in that namespace.
func (h *Host) in(f func() error) error {
	runtime.LockOSThread()
	origin, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer origin.Close()
	if err := netns.Set(h.ns); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := f()
	if err := netns.Set(origin); err != nil {
		return fmt.Errorf("returning to the original network namespace: %w", err) // thread stays locked
	}
	runtime.UnlockOSThread()
	return ferr
}

// ListenTCP listens on the host at addr:0 and returns the listener (closed at test end).
func (h *Host) ListenTCP(t testing.TB, addr netip.Addr) *net.TCPListener {
	t.Helper()
	var l *net.TCPListener
	err := h.in(func() (err error) {
		l, err = net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// ListenUDP listens on the host at addr:0 (closed at test end).
func (h *Host) ListenUDP(t testing.TB, addr netip.Addr) *net.UDPConn {
	t.Helper()
	var c *net.UDPConn
	err := h.in(func() (err error) {
		c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(addr, 0)))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
