package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// workerEnv marks a re-executed bench binary as a worker: it joins the network namespace passed
// as file descriptor 3, runs one loop and prints the nanoseconds per operation.
const workerEnv = "TETHER_BENCH_WORKER"

// runWorker runs one sample: the worker is born in cgroup (CLONE_INTO_CGROUP).
// extraEnv is added to the worker's environment (sampleEnv, rateEnv).
func (e *env) runWorker(cgroup, mode, target string, ops int, extraEnv ...string) (float64, error) {
	out, err := e.runWorkerOut(cgroup, mode, target, ops, extraEnv...)
	if err != nil {
		return 0, err
	}
	return strconv.ParseFloat(out, 64)
}

// runWorkerOut is runWorker, returning what the worker printed.
func (e *env) runWorkerOut(cgroup, mode, target string, ops int, extraEnv ...string) (string, error) {
	dir, err := os.Open(cgroup)
	if err != nil {
		return "", err
	}
	defer dir.Close()
	cmd := exec.Command(e.self, mode, target, strconv.Itoa(ops))
	cmd.Env = append(append(os.Environ(), workerEnv+"=1"), extraEnv...)
	cmd.ExtraFiles = []*os.File{e.netns}
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return "", fmt.Errorf("worker %s %s in %s: %v: %s", mode, target, cgroup, err, ee.Stderr)
		}
		return "", err
	}
	return strings.TrimSpace(string(out)), nil
}

func worker(args []string) int {
	runtime.LockOSThread() // every socket of the loop lives in the namespace of this thread
	if err := unix.Setns(3, unix.CLONE_NEWNET); err != nil {
		fmt.Fprintln(os.Stderr, "joining the network namespace:", err)
		return 1
	}
	if len(args) != 3 {
		fmt.Fprintln(os.Stderr, "worker: want MODE TARGET OPS")
		return 2
	}
	ops, err := strconv.Atoi(args[2])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	if args[0] == "hold" {
		return hold(args[1], ops)
	}
	if args[0] == "dnslat" || args[0] == "dnslearn" {
		if err := dnsWorker(args[0], args[1], ops); err != nil {
			fmt.Fprintf(os.Stderr, "%s %s: %v\n", args[0], args[1], err)
			return 1
		}
		return 0
	}
	// One CPU for the loop: no migrations in the middle of a sample.
	if _, last, ok := cpuRange(); ok {
		var set unix.CPUSet
		set.Set(last)
		unix.SchedSetaffinity(0, &set)
	}
	sample := sampleTime
	if v := os.Getenv(sampleEnv); v != "" {
		if sample, err = time.ParseDuration(v); err != nil {
			fmt.Fprintln(os.Stderr, sampleEnv, err)
			return 2
		}
	}
	rate, _ := strconv.Atoi(os.Getenv(rateEnv))
	start := time.Now()
	done, err := loop(args[0], args[1], ops, start.Add(sample), rate)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s %s: %v\n", args[0], args[1], err)
		return 1
	}
	fmt.Println(float64(time.Since(start).Nanoseconds()) / float64(done))
	return 0
}

// cpuRange returns the first and last CPU this process may run on, when there are several.
func cpuRange() (first, last int, ok bool) {
	var set unix.CPUSet
	if unix.SchedGetaffinity(0, &set) != nil || set.Count() < 2 {
		return 0, 0, false
	}
	first = -1
	for c := range 1024 {
		if set.IsSet(c) {
			if first < 0 {
				first = c
			}
			last = c
		}
	}
	return first, last, true
}

// sampleTime bounds a sample: slow configurations (nftables with many rules) do fewer operations.
// A worker's environment may set another (sampleEnv), and a rate of operations per second
// (rateEnv) that the loop keeps to instead of going as fast as it can.
const (
	sampleTime = 400 * time.Millisecond
	sampleEnv  = "TETHER_BENCH_SAMPLE"
	rateEnv    = "TETHER_BENCH_RATE"
)

// minOps is done even past sampleTime.
const minOps = 20

// loop does up to ops operations with raw system calls, so that little but the kernel is
// measured, stopping at deadline (checked every 16 operations) once minOps are done. It returns
// how many it did. A failed operation fails the sample: a denied connect would measure something
// else.
func loop(mode, target string, ops int, deadline time.Time, rate int) (int, error) {
	n, err := 0, error(nil)
	start := time.Now()
	more := func() bool {
		n++
		if rate > 0 && n%100 == 0 {
			time.Sleep(time.Until(start.Add(time.Duration(n) * time.Second / time.Duration(rate))))
		}
		return n < ops && (n < minOps || n%16 != 0 || time.Now().Before(deadline))
	}
	err = runOps(mode, target, more)
	return n, err
}

func runOps(mode, target string, more func() bool) error {
	if mode == "exec" {
		return execOps(target, more)
	}
	ap, err := netip.ParseAddrPort(target)
	if err != nil {
		return err
	}
	sa := &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	switch mode {
	case "tcp":
		return tcpOps(sa, more)
	case "tcpbulk": // one connection, 64 KiB per write
		return tcpBulkOps(sa, more)
	case "udpdeny", "udpconnect", "udpsend":
		return udpOps(mode, target, sa, more)
	}
	return fmt.Errorf("unknown mode %q", mode)
}

// execOps runs target (true) and waits for it, while more says so.
func execOps(target string, more func() bool) error {
	attr := &syscall.ProcAttr{Env: []string{}}
	for ok := true; ok; ok = more() {
		pid, err := syscall.ForkExec(target, []string{target}, attr)
		if err != nil {
			return err
		}
		var ws syscall.WaitStatus
		if _, err := syscall.Wait4(pid, &ws, 0, nil); err != nil {
			return err
		}
		if !ws.Exited() || ws.ExitStatus() != 0 {
			return fmt.Errorf("%s: %v", target, ws)
		}
	}
	return nil
}

// tcpOps connects to sa and closes the connection, while more says so.
func tcpOps(sa *unix.SockaddrInet4, more func() bool) error {
	linger := &unix.Linger{Onoff: 1, Linger: 0} // close with RST: no TIME_WAIT to run out of ports
	for ok := true; ok; ok = more() {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		if err := unix.Connect(fd, sa); err != nil {
			unix.Close(fd)
			return err
		}
		unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, linger)
		unix.Close(fd)
	}
	return nil
}

// tcpBulkOps writes 64 KiB to one connection to sa, while more says so.
func tcpBulkOps(sa *unix.SockaddrInet4, more func() bool) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, sa); err != nil {
		return err
	}
	buf := make([]byte, 64<<10)
	for ok := true; ok; ok = more() {
		for off := 0; off < len(buf); {
			n, err := unix.Write(fd, buf[off:])
			if err != nil {
				return err
			}
			off += n
		}
	}
	return nil
}

// udpOps connects a UDP socket to sa, target (udpdeny: every connect must be denied; udpconnect) or
// sends it a datagram (udpsend), while more says so.
func udpOps(mode, target string, sa *unix.SockaddrInet4, more func() bool) error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	msg := []byte("x")
	for ok := true; ok; ok = more() {
		switch mode {
		case "udpdeny":
			if err := unix.Connect(fd, sa); !errors.Is(err, unix.EPERM) {
				return fmt.Errorf("connect %s: %v, want EPERM", target, err)
			}
			continue
		case "udpconnect":
			err = unix.Connect(fd, sa)
		default:
			err = unix.Sendto(fd, msg, 0, sa)
		}
		if err != nil && !errors.Is(err, unix.ENOBUFS) {
			return err
		}
	}
	return nil
}

// hold opens n TCP connections to target, prints "ready", and waits for stdin to close; then it
// prints how many of them the kernel terminated (SO_ERROR is ECONNABORTED).
func hold(target string, n int) int {
	ap, err := netip.ParseAddrPort(target)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	sa := &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	fds := make([]int, 0, n)
	for range n {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err == nil {
			err = unix.Connect(fd, sa)
		}
		if err != nil {
			fmt.Fprintf(os.Stderr, "connection %d of %d: %v\n", len(fds)+1, n, err)
			return 1
		}
		fds = append(fds, fd)
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	aborted := 0
	for _, fd := range fds {
		if e, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ERROR); err == nil && syscall.Errno(e) == unix.ECONNABORTED {
			aborted++
		}
		unix.Close(fd)
	}
	fmt.Println(aborted)
	return 0
}
