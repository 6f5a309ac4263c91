package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/internal/privtest"
	"github.com/tether-sh/tether/pkg/bpffs"
	"github.com/tether-sh/tether/pkg/cgroups"
	"github.com/tether-sh/tether/pkg/compile"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/grants"
	"github.com/tether-sh/tether/pkg/kernel"
)

// env is what the benchmark runs in: cgroups, a client network namespace, listeners, and the
// state (tether, nftables) it switches between.
type env struct {
	root                         string // cgroup2 mount
	base, parent, agent, outside string // cgroups
	agentLevel                   int
	pin                          string
	host                         *privtest.Host // the client namespace; its veth peer is ours
	netns                        *os.File
	self, trueBin                string
	tcpLo, udpLo, tcpVeth        netip.AddrPort
	tcpBulk, tcpHold             netip.AddrPort // on our side of the veth: drained; held open
	held                         *heldConns
	closers                      []io.Closer
	k                            *kernel.Kernel
	tetherRules, nftRules        int
	nftSet                       bool
	agentID                      uint64
	unboundID                    uint64 // a cgroup below the agent parent bound to no agent
	lastCompile, lastInstall     time.Duration
}

func setup() (_ *env, err error) {
	e := &env{}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	var b [4]byte
	rand.Read(b[:])
	name := "tether-bench-" + hex.EncodeToString(b[:])
	if e.root, err = cgroups.Mount(); err != nil {
		return nil, err
	}
	e.base = filepath.Join(e.root, name)
	e.parent = filepath.Join(e.base, "parent")
	e.agent = filepath.Join(e.parent, "agent")
	e.outside = filepath.Join(e.base, "outside")
	for _, p := range []string{e.agent, e.outside} {
		if _, err := cgroups.Create(p); err != nil {
			return nil, err
		}
	}
	if e.agentID, err = cgroups.ID(e.agent); err != nil {
		return nil, err
	}
	if e.unboundID, err = cgroups.Create(filepath.Join(e.parent, "unbound")); err != nil {
		return nil, err
	}
	e.agentLevel, _ = cgroups.Level(e.root, e.agent)
	e.pin = filepath.Join("/sys/fs/bpf", name)
	if e.self, err = os.Executable(); err != nil {
		return nil, err
	}
	if e.trueBin, err = exec.LookPath("true"); err != nil {
		return nil, err
	}
	if _, err := exec.LookPath("nft"); err != nil {
		return nil, errors.New("nft not found: the nftables baseline needs it (apt-get install nftables)")
	}
	if _, err := exec.LookPath("nsenter"); err != nil {
		return nil, errors.New("nsenter not found (util-linux)")
	}
	if e.host, err = privtest.StartHost(); err != nil {
		return nil, fmt.Errorf("creating the client network namespace: %w", err)
	}
	nsfd, err := unix.Dup(e.host.NetNS())
	if err != nil {
		return nil, err
	}
	e.netns = os.NewFile(uintptr(nsfd), "netns")
	e.closers = append(e.closers, e.netns)

	return e, e.listen()
}

// listen starts the listeners: TCP and UDP on loopback inside the client namespace, TCP on our
// side of the veth.
func (e *env) listen() error {
	var tcpLo *net.TCPListener
	var udpLo *net.UDPConn
	err := e.host.In(func() (err error) {
		if tcpLo, err = net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			return err
		}
		udpLo, err = net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		return err
	})
	if err != nil {
		return err
	}
	tcpVeth, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(e.host.Ours4, 0)))
	if err != nil {
		return err
	}
	tcpBulk, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(e.host.Ours4, 0)))
	if err != nil {
		return err
	}
	tcpHold, err := net.ListenTCP("tcp", net.TCPAddrFromAddrPort(netip.AddrPortFrom(e.host.Ours4, 0)))
	if err != nil {
		return err
	}
	e.held = &heldConns{}
	go drainLoop(tcpBulk)
	go e.held.accept(tcpHold)
	e.tcpBulk = tcpBulk.Addr().(*net.TCPAddr).AddrPort()
	e.tcpHold = tcpHold.Addr().(*net.TCPAddr).AddrPort()
	e.closers = append(e.closers, tcpLo, udpLo, tcpVeth, tcpBulk, tcpHold, e.held)
	for _, l := range []*net.TCPListener{tcpLo, tcpVeth} {
		for range 2 {
			go acceptLoop(l)
		}
	}
	e.tcpLo = tcpLo.Addr().(*net.TCPAddr).AddrPort()
	e.udpLo = udpLo.LocalAddr().(*net.UDPAddr).AddrPort()
	e.tcpVeth = tcpVeth.Addr().(*net.TCPAddr).AddrPort()
	return nil
}

func acceptLoop(l *net.TCPListener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		c.Close()
	}
}

// drainLoop reads every connection of l to its end: the receiving side of the bulk probe.
func drainLoop(l *net.TCPListener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			io.Copy(io.Discard, c)
			c.Close()
		}()
	}
}

// heldConns keeps the connections it accepts open until dropped: the peers of the live sockets
// the sweep benchmark terminates.
type heldConns struct {
	mu    sync.Mutex
	conns []net.Conn
}

func (h *heldConns) accept(l *net.TCPListener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		h.mu.Lock()
		h.conns = append(h.conns, c)
		h.mu.Unlock()
	}
}

// drop closes the connections held so far.
func (h *heldConns) drop() {
	h.mu.Lock()
	defer h.mu.Unlock()
	for _, c := range h.conns {
		c.Close()
	}
	h.conns = nil
}

func (h *heldConns) Close() error { h.drop(); return nil }

func (e *env) close() {
	e.setTether(0)
	// A load that failed halfway leaves pins without a handle: they go too.
	if _, err := os.Stat(e.pin); e.pin != "" && err == nil {
		if err := bpffs.RemovePins(e.pin); err != nil {
			fmt.Fprintln(os.Stderr, "bench: removing pins:", err)
		}
	}
	for _, c := range e.closers {
		c.Close()
	}
	if e.host != nil {
		e.host.Close() // the namespace goes, and every nftables rule in it
	}
	if e.base != "" {
		if err := cgroups.Remove(e.base, 10*time.Second); err != nil {
			fmt.Fprintln(os.Stderr, "bench: removing cgroups:", err)
		}
	}
}

// grantsFor are n egress rules for the agent: n-7 filler addresses, a /24 and a /16 range (for
// the hot path's range rows) and the five destinations the benchmark connects to, last; exec of
// the worker and of true.
func (e *env) grantsFor(n int) grants.Grants {
	g := grants.Grants{Exec: []grants.Exec{{Path: e.self}, {Path: e.trueBin}}}
	for i := range max(n-7, 0) {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		g.Egress = append(g.Egress, grants.Egress{CIDR: a.String() + "/32", Protocol: "tcp", Ports: []grants.PortRange{{Lo: 9000, Hi: 9000}}})
	}
	for _, r := range []netip.Prefix{range24, range16} {
		g.Egress = append(g.Egress, grants.Egress{CIDR: r.String(), Protocol: "tcp", Ports: []grants.PortRange{{Lo: 443, Hi: 443}}})
	}
	for _, d := range []struct {
		ap    netip.AddrPort
		proto string
	}{{e.tcpLo, "tcp"}, {e.udpLo, "udp"}, {e.tcpVeth, "tcp"}, {e.tcpBulk, "tcp"}, {e.tcpHold, "tcp"}} {
		g.Egress = append(g.Egress, grants.Egress{CIDR: d.ap.Addr().String() + "/32", Protocol: d.proto,
			Ports: []grants.PortRange{{Lo: d.ap.Port(), Hi: d.ap.Port()}}})
	}
	return g
}

// settle gives the kernel time to finish what loading or unloading programs and maps leaves
// it (freeing under RCU, JIT), so that it does not land in the next sample.
const settle = 300 * time.Millisecond

// setTether loads tether with n rules for the agent (0: unloaded, nothing pinned).
func (e *env) setTether(n int) error {
	if n == e.tetherRules {
		return nil
	}
	defer time.Sleep(settle)
	if n == 0 {
		e.k.Close()
		e.k, e.tetherRules = nil, 0
		return bpffs.RemovePins(e.pin)
	}
	if e.k == nil {
		k, err := kernel.Open(kernel.Options{PinDir: e.pin, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			return err
		}
		e.k = k
		if err := k.AttachParent(e.parent); err != nil {
			return err
		}
	}
	start := time.Now()
	res := compile.Compile(context.Background(), e.grantsFor(n), compile.Options{Files: compile.OS{}})
	if err := res.Err(); err != nil {
		return err
	}
	e.lastCompile = time.Since(start)
	start = time.Now()
	if err := e.k.Install(0, &res.RuleSet); err != nil {
		return err
	}
	e.lastInstall = time.Since(start)
	if err := e.k.SetFlags(0, dataplane.AgentActive); err != nil {
		return err
	}
	if err := e.k.PutInfo(0, dataplane.Info{SpiffeID: "spiffe://bench.local/agent", CgroupPath: e.agent, CgroupID: e.agentID}); err != nil {
		return err
	}
	if err := e.k.Bind(e.agentID, 0); err != nil {
		return err
	}
	e.tetherRules = n
	return nil
}

// setNftables installs, in the client namespace, the rules a user would write instead of
// tether's: n rules matching the agent's cgroup (socket cgroupv2) and a destination, the three
// real destinations last, then a drop for the agent; or, with set, one rule looking the
// destination up in a set of n elements. n == 0 removes them.
func (e *env) setNftables(n int, set bool) error {
	if n == e.nftRules && set == e.nftSet {
		return nil
	}
	defer time.Sleep(settle)
	var b strings.Builder
	b.WriteString("flush ruleset\n")
	if n > 0 {
		// nft resolves the cgroup path below /sys/fs/cgroup, whatever the cgroup2 mount is.
		rel, err := filepath.Rel("/sys/fs/cgroup", e.agent)
		if err != nil {
			return err
		}
		match := fmt.Sprintf("socket cgroupv2 level %d %q", e.agentLevel, rel)
		var dests []string
		for i := range max(n-3, 0) {
			dests = append(dests, fmt.Sprintf("10.%d.%d.%d . 9000", byte(i>>16), byte(i>>8), byte(i)))
		}
		for _, ap := range []netip.AddrPort{e.tcpLo, e.udpLo, e.tcpVeth} {
			dests = append(dests, fmt.Sprintf("%s . %d", ap.Addr(), ap.Port()))
		}
		b.WriteString("table inet tether_bench {\n")
		if set {
			fmt.Fprintf(&b, "  set allowed { type ipv4_addr . inet_service; elements = { %s } }\n", strings.Join(dests, ", "))
			fmt.Fprintf(&b, "  chain out {\n    type filter hook output priority 0; policy accept;\n")
			fmt.Fprintf(&b, "    %s ip daddr . th dport @allowed accept\n", match)
		} else {
			fmt.Fprintf(&b, "  chain out {\n    type filter hook output priority 0; policy accept;\n")
			for _, d := range dests {
				addr, port, _ := strings.Cut(d, " . ")
				fmt.Fprintf(&b, "    %s ip daddr %s th dport %s accept\n", match, addr, port)
			}
		}
		fmt.Fprintf(&b, "    %s drop\n  }\n}\n", match)
	}
	f, err := os.CreateTemp("", "tether-bench-nft")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	f.WriteString(b.String())
	f.Close()
	cmd := exec.Command("nsenter", "--net=/proc/self/fd/3", "nft", "-f", f.Name())
	cmd.ExtraFiles = []*os.File{e.netns}
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft -f: %v: %s", err, out)
	}
	e.nftRules, e.nftSet = n, set
	return nil
}
