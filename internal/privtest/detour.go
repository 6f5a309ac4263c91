package privtest

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Detours: packets addressed to a destination the connect hook allowed that leave for another
// host, by an IPv6 routing header or IPv4 source-route options, and a capture on a test host's
// link that says whether any of them arrived there.

// helperDetour sends one datagram carrying args[3] (a marker) to args[1] (an allowed address)
// with a detour through args[2] (a host nobody granted):
//
//	rthdr6     setsockopt(IPV6_RTHDR) with a segment routing header (type 4) whose next segment is via
//	ipopt4     setsockopt(IP_OPTIONS) with a loose source route through via
//	lsrr4cmsg  a loose source route through via as ancillary data of the one message (IP_RETOPTS)
//
// It prints "setsockopt:RESULT send:RESULT" (see Result; "-" for a step not taken).
func helperDetour(args []string) int {
	if len(args) != 4 {
		fmt.Fprintln(os.Stderr, "detour: want KIND ADDRESS:PORT VIA MARKER")
		return 2
	}
	to, err1 := netip.ParseAddrPort(args[1])
	via, err2 := netip.ParseAddr(args[2])
	if err1 != nil || err2 != nil {
		fmt.Fprintln(os.Stderr, "detour: bad address")
		return 2
	}
	marker := []byte(args[3])
	opt, send := "-", "-"
	switch args[0] {
	case "rthdr6":
		fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_DGRAM, 0)
		if err != nil {
			fmt.Println(Result(err))
			return 1
		}
		defer unix.Close(fd)
		opt = Result(unix.SetsockoptString(fd, unix.IPPROTO_IPV6, unix.IPV6_RTHDR, string(SegmentRoutingHeader(via))))
		if opt == "ok" {
			send = Result(connectSend(fd, &unix.SockaddrInet6{Port: int(to.Port()), Addr: to.Addr().As16()}, marker))
		}
	case "ipopt4":
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			fmt.Println(Result(err))
			return 1
		}
		defer unix.Close(fd)
		opt = Result(unix.SetsockoptString(fd, unix.IPPROTO_IP, unix.IP_OPTIONS, string(LooseSourceRoute(via))))
		if opt == "ok" {
			send = Result(connectSend(fd, &unix.SockaddrInet4{Port: int(to.Port()), Addr: to.Addr().As4()}, marker))
		}
	case "lsrr4cmsg":
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err != nil {
			fmt.Println(Result(err))
			return 1
		}
		defer unix.Close(fd)
		lsrr := LooseSourceRoute(via)
		oob := make([]byte, unix.CmsgSpace(len(lsrr)))
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		h.Level, h.Type = unix.IPPROTO_IP, unix.IP_RETOPTS
		h.SetLen(unix.CmsgLen(len(lsrr)))
		copy(oob[unix.CmsgLen(0):], lsrr)
		send = Result(unix.Sendmsg(fd, marker, oob, &unix.SockaddrInet4{Port: int(to.Port()), Addr: to.Addr().As4()}, 0))
	default:
		fmt.Fprintf(os.Stderr, "detour: unknown kind %q\n", args[0])
		return 2
	}
	fmt.Printf("setsockopt:%s send:%s\n", opt, send)
	return 0
}

func connectSend(fd int, sa unix.Sockaddr, b []byte) error {
	if err := unix.Connect(fd, sa); err != nil {
		return err
	}
	_, err := unix.Write(fd, b)
	return err
}

// SegmentRoutingHeader is an IPv6 routing header of type 4 (segment routing) with two segments:
// the kernel writes the socket's destination into the first, and sends the packet to the second,
// next.
func SegmentRoutingHeader(next netip.Addr) []byte {
	b := make([]byte, 8+2*16)
	b[1] = 4 // hdrlen: 8-byte units after the first 8 bytes
	b[2] = 4 // type: segment routing
	b[3] = 1 // segments left
	b[4] = 1 // last entry
	a := next.As16()
	copy(b[8+16:], a[:])
	return b
}

// LooseSourceRoute is the IPv4 option LSRR (131) through first, padded to 8 bytes.
func LooseSourceRoute(first netip.Addr) []byte {
	a := first.As4()
	return []byte{131, 7, 4, a[0], a[1], a[2], a[3], 0}
}

// Capture records the packets that arrive at a test host's end of its veth pair.
type Capture struct {
	mu   sync.Mutex
	pkts [][]byte
	stop atomic.Bool
	done chan struct{}
}

// Capture starts recording the packets that reach the host's link, until the test ends.
func (h *Host) Capture(t testing.TB) *Capture {
	t.Helper()
	var fd int
	err := h.in(func() error {
		ifi, err := net.InterfaceByName(h.peer)
		if err != nil {
			return err
		}
		proto := int(htons(unix.ETH_P_ALL))
		if fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, proto); err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifi.Index}); err != nil {
			unix.Close(fd)
			return err
		}
		tv := unix.NsecToTimeval(int64(50 * time.Millisecond))
		return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	})
	if err != nil {
		t.Fatalf("capturing on %s: %v", h.peer, err)
	}
	c := &Capture{done: make(chan struct{})}
	go func() {
		defer close(c.done)
		defer unix.Close(fd)
		buf := make([]byte, 65536)
		for !c.stop.Load() {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				if err == syscall.EAGAIN || err == syscall.EINTR {
					continue
				}
				return
			}
			c.mu.Lock()
			c.pkts = append(c.pkts, bytes.Clone(buf[:n]))
			c.mu.Unlock()
		}
	}()
	t.Cleanup(func() { c.stop.Store(true); <-c.done })
	return c
}

// Saw counts the captured packets that carry marker.
func (c *Capture) Saw(marker string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, p := range c.pkts {
		if bytes.Contains(p, []byte(marker)) {
			n++
		}
	}
	return n
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
