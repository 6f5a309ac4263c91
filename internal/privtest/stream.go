package privtest

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Streams: an agent that keeps sending on one connection (the stream helper), and a peer on a
// test host that records what arrives and when, by the kernel's clock of its arrival, so that a
// test can say whether one byte reached the peer after a given moment.

// helperStream connects (tcp, tcp6, udp, udp6: a connected socket) to args[1] and streams on it
// (see stream) until stdin closes.
func helperStream(args []string) int {
	if len(args) != 2 {
		fmt.Fprintln(os.Stderr, "stream: want NETWORK ADDRESS")
		return 2
	}
	stop := stdinClosed()
	c, err := net.DialTimeout(args[0], args[1], 2*time.Second)
	if err != nil {
		fmt.Println(errnoName(err))
		<-stop
		return 0
	}
	defer c.Close()
	stream(c, stop)
	return 0
}

// helperServe listens on args[0] (address:0), prints the address it listens on, accepts one
// connection and streams on it (see stream) until stdin closes.
func helperServe(args []string) int {
	if len(args) != 1 {
		fmt.Fprintln(os.Stderr, "serve: want ADDRESS")
		return 2
	}
	l, err := net.Listen("tcp", args[0])
	if err != nil {
		fmt.Println(errnoName(err))
		return 1
	}
	fmt.Println(l.Addr())
	stop := stdinClosed()
	go func() { <-stop; l.Close() }()
	c, err := l.Accept()
	if err != nil {
		fmt.Println(errnoName(err))
		<-stop
		return 0
	}
	defer c.Close()
	stream(c, stop)
	return 0
}

// stdinClosed is closed when standard input closes (the test's way to end a helper).
func stdinClosed() chan struct{} {
	stop := make(chan struct{})
	go func() {
		bufio.NewReader(os.Stdin).ReadString('\n')
		close(stop)
	}()
	return stop
}

// stream writes 256 bytes every millisecond on c until stop closes or a write fails. It prints
// "connected" once the first write went through, "stalled" the first time a write is not taken
// within 200 ms (a TCP send buffer that stays full: the packets are dropped), and, when a write
// fails, the error that ended it ("econnaborted", "eperm", ...), then waits for stop.
func stream(c net.Conn, stop chan struct{}) {
	buf := make([]byte, 256)
	first, stalled := true, false
	for {
		select {
		case <-stop:
			return
		default:
		}
		c.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
		_, err := c.Write(buf)
		var ne net.Error
		switch {
		case err == nil:
			if first {
				fmt.Println("connected")
				first = false
			}
		case errors.As(err, &ne) && ne.Timeout():
			if !stalled {
				fmt.Println("stalled")
				stalled = true
			}
			continue
		default:
			fmt.Println(errnoName(err))
			<-stop
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// StartServer starts the serve helper in the cgroup at cgroupPath, connects to it from the test
// and returns the stream (past "connected") and the test's end, which counts what arrives.
func StartServer(t testing.TB, cgroupPath, address string) (*Stream, *Peer) {
	t.Helper()
	cmd := Command(t, cgroupPath, "serve", address)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &Stream{lines: make(chan string, 16), stdin: stdin, wait: cmd.Wait}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
		close(s.lines)
	}()
	t.Cleanup(func() { s.Stop() })
	addr := s.Next(t, 5*time.Second)
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		t.Fatalf("serve helper: %q", addr)
	}
	c, err := net.DialTCP("tcp", nil, net.TCPAddrFromAddrPort(ap))
	if err != nil {
		t.Fatal(err)
	}
	p := &Peer{network: "tcp", Addr: ap, conns: []*net.TCPConn{c}}
	go func() {
		buf := make([]byte, 64<<10)
		for {
			if _, err := c.Read(buf); err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() { c.Close() })
	if got := s.Next(t, 5*time.Second); got != "connected" {
		t.Fatalf("serve helper in %s: %s, want connected", cgroupPath, got)
	}
	return s, p
}

// errnoName names the errno of err in lower case ("econnaborted"), or says "error:..." for
// anything else.
func errnoName(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		if name := unix.ErrnoName(errno); name != "" {
			return strings.ToLower(name)
		}
	}
	return "error:" + strings.ReplaceAll(err.Error(), " ", "_")
}

// Stream is a running stream helper.
type Stream struct {
	lines chan string
	stdin interface{ Close() error }
	wait  func() error
}

// StartStream starts the stream helper in the cgroup at cgroupPath (an agent, or a control
// outside agents) and waits until it says how its connect went: "connected" or the error.
func StartStream(t testing.TB, cgroupPath, network, address string) *Stream {
	t.Helper()
	return startStream(t, Command(t, cgroupPath, "stream", network, address), network, address, cgroupPath)
}

// StartStreamIn is StartStream with the helper's socket in the network namespace of host h.
func StartStreamIn(t testing.TB, h *Host, cgroupPath, network, address string) *Stream {
	t.Helper()
	return startStreamIn(t, h, cgroupPath, network, address, "1")
}

// StartStreamInThread is StartStreamIn with only the thread that makes the socket in h's
// namespace: the helper's first thread, which /proc/PID/ns/net names, stays in the test's.
func StartStreamInThread(t testing.TB, h *Host, cgroupPath, network, address string) *Stream {
	t.Helper()
	return startStreamIn(t, h, cgroupPath, network, address, "thread")
}

func startStreamIn(t testing.TB, h *Host, cgroupPath, network, address, how string) *Stream {
	t.Helper()
	cmd := InHost(t, h, Command(t, cgroupPath, "stream", network, address))
	cmd.Env[len(cmd.Env)-1] = netnsEnv + "=" + how
	return startStream(t, cmd, network, address, cgroupPath)
}

func startStream(t testing.TB, cmd *exec.Cmd, network, address, cgroupPath string) *Stream {
	t.Helper()
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	s := &Stream{lines: make(chan string, 16), stdin: stdin, wait: cmd.Wait}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			s.lines <- sc.Text()
		}
		close(s.lines)
	}()
	t.Cleanup(func() { s.Stop() })
	if got := s.Next(t, 5*time.Second); got != "connected" {
		t.Fatalf("stream %s %s from %s: %s, want connected", network, address, cgroupPath, got)
	}
	return s
}

// Next is the helper's next line, or "none" after timeout.
func (s *Stream) Next(t testing.TB, timeout time.Duration) string {
	t.Helper()
	select {
	case l, ok := <-s.lines:
		if !ok {
			return "exited"
		}
		return l
	case <-time.After(timeout):
		return "none"
	}
}

// Stop ends the helper.
func (s *Stream) Stop() {
	if s.stdin != nil {
		s.stdin.Close()
		s.wait()
		s.stdin = nil
	}
}

// Peer counts what arrives at one listener of a test host: bytes over TCP (every connection)
// or datagrams over UDP, with the kernel's time of arrival.
type Peer struct {
	mu    sync.Mutex
	conns []*net.TCPConn
	// UDP: arrival times of the datagrams, by the kernel's receive timestamp.
	arrivals []time.Time
	bytes    int
	resets   int // connections whose read ended with ECONNRESET
	network  string
	Addr     netip.AddrPort
}

// ListenPeer listens on the host at addr (tcp or udp) and counts what arrives.
func (h *Host) ListenPeer(t testing.TB, network string, addr netip.Addr) *Peer {
	t.Helper()
	p := &Peer{network: network}
	switch network {
	case "tcp":
		l := h.ListenTCP(t, addr)
		p.Addr = netip.MustParseAddrPort(l.Addr().String())
		go func() {
			for {
				c, err := l.AcceptTCP()
				if err != nil {
					return
				}
				p.mu.Lock()
				p.conns = append(p.conns, c)
				p.mu.Unlock()
				go func() {
					buf := make([]byte, 64<<10)
					for {
						n, err := c.Read(buf)
						p.mu.Lock()
						p.bytes += n
						if errors.Is(err, syscall.ECONNRESET) {
							p.resets++
						}
						p.mu.Unlock()
						if err != nil {
							return
						}
					}
				}()
			}
		}()
		t.Cleanup(func() {
			p.mu.Lock()
			defer p.mu.Unlock()
			for _, c := range p.conns {
				c.Close()
			}
		})
	case "udp":
		c := h.ListenUDP(t, addr)
		p.Addr = netip.MustParseAddrPort(c.LocalAddr().String())
		raw, err := c.SyscallConn()
		if err != nil {
			t.Fatal(err)
		}
		raw.Control(func(fd uintptr) { err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1) })
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			buf := make([]byte, 64<<10)
			oob := make([]byte, 128)
			for {
				n, oobn, _, _, err := c.ReadMsgUDP(buf, oob)
				if err != nil {
					return
				}
				at := time.Now()
				if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
					for _, m := range msgs {
						if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SO_TIMESTAMPNS && len(m.Data) >= int(unsafe.Sizeof(unix.Timespec{})) {
							ts := (*unix.Timespec)(unsafe.Pointer(&m.Data[0]))
							at = time.Unix(ts.Unix())
						}
					}
				}
				p.mu.Lock()
				p.arrivals = append(p.arrivals, at)
				p.bytes += n
				p.mu.Unlock()
			}
		}()
	default:
		t.Fatalf("peer network %q", network)
	}
	return p
}

// Received is what has reached the peer's kernel: bytes received over all TCP connections (the
// kernel's count, whether read yet or not), or datagrams received.
func (p *Peer) Received() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.network == "udp" {
		return len(p.arrivals)
	}
	n := 0
	for _, c := range p.conns {
		raw, err := c.SyscallConn()
		if err != nil {
			continue
		}
		raw.Control(func(fd uintptr) {
			if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
				n += int(info.Bytes_received)
			}
		})
	}
	return n
}

// Conn is a peer that counts only the i-th connection p accepted (TCP).
func (p *Peer) Conn(i int) *Peer {
	p.mu.Lock()
	defer p.mu.Unlock()
	one := &Peer{network: p.network, Addr: p.Addr}
	if i < len(p.conns) {
		one.conns = []*net.TCPConn{p.conns[i]}
	}
	return one
}

// Resets counts the connections the peer saw reset (TCP).
func (p *Peer) Resets() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.resets
}

// ArrivedAfter counts the datagrams that arrived after at (UDP peers).
func (p *Peer) ArrivedAfter(at time.Time) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, a := range p.arrivals {
		if a.After(at) {
			n++
		}
	}
	return n
}

// WaitReceiving waits until something arrives (more than now has).
func (p *Peer) WaitReceiving(t testing.TB) {
	t.Helper()
	p.WaitReceivingWithin(t, 5*time.Second)
}

// WaitReceivingWithin is WaitReceiving with its own limit: a TCP stream whose packets were dropped
// for seconds resumes at its next retransmission, which backs off as the drops go on.
func (p *Peer) WaitReceivingWithin(t testing.TB, limit time.Duration) {
	t.Helper()
	n := p.Received()
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if p.Received() > n {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("nothing arrives at %s", p.Addr)
}

// inFlight is how long a packet that passed the agent's hooks before a verdict may still take to
// be counted by the receiving kernel: a veth or loopback transmit queues it for the receiver's
// softirq, which a loaded machine defers to ksoftirqd. Nothing sent after the verdict is excused:
// the streams write without pause, so a leak goes on for the whole 300 ms window, and a TCP
// retransmission comes no sooner than the 200 ms minimum RTO.
const inFlight = 20 * time.Millisecond

// QuietAfter fails the test unless nothing reaches p after the moment at, judged settle after it
// (plus inFlight): for TCP, the bytes the host's kernel received then and 300 ms later; for UDP,
// the arrival time of every datagram.
func QuietAfter(t testing.TB, what string, p *Peer, at time.Time, settle time.Duration) {
	t.Helper()
	from := at.Add(settle + inFlight)
	if p.network == "udp" {
		time.Sleep(time.Until(from.Add(300 * time.Millisecond)))
		if n := p.ArrivedAfter(from); n > 0 {
			t.Errorf("%s: %d datagrams arrived more than %s after", what, n, settle+inFlight)
		}
		return
	}
	time.Sleep(time.Until(from))
	then := p.Received()
	time.Sleep(300 * time.Millisecond)
	if now := p.Received(); now != then {
		t.Errorf("%s: %d bytes arrived more than %s after", what, now-then, settle+inFlight)
	}
}

// Flowing fails the test unless more reaches p within 300 ms.
func Flowing(t testing.TB, what string, p *Peer) {
	t.Helper()
	before := p.Received()
	time.Sleep(300 * time.Millisecond)
	if p.Received() == before {
		t.Errorf("%s: the stream stopped", what)
	}
}

// Ended checks how an agent's stream on network ended. Terminated, a TCP socket fails with
// ECONNABORTED, and a UDP socket is disconnected: its next send fails with EDESTADDRREQ, unless a
// datagram sent between the verdict and the sweep was dropped first (EPERM). Without termination,
// a TCP stream stalls (its packets are dropped, its send buffer fills) and UDP sends fail with
// EPERM.
func (s *Stream) Ended(t testing.TB, what, network string, terminated bool) {
	t.Helper()
	want := map[string][]string{"tcp": {"econnaborted"}, "udp": {"edestaddrreq", "eperm"}}[network]
	if !terminated {
		want = map[string][]string{"tcp": {"stalled"}, "udp": {"eperm"}}[network]
	}
	if got := s.Next(t, 3*time.Second); !slices.Contains(want, got) {
		t.Errorf("%s: %q, want one of %q", what, got, want)
	}
}
