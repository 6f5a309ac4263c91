package privtest

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// helperEnv names the helper a re-executed test binary runs instead of its tests; netnsEnv makes
// it run in the network namespace passed as descriptor 3.
const (
	helperEnv = "TETHER_TEST_HELPER"
	netnsEnv  = "TETHER_TEST_NETNS"
)

var helpers = map[string]func(args []string) int{
	"dial":         helperDial,
	"loop":         helperLoop,
	"spawn":        helperSpawn,
	"tcploop":      helperTCPLoop,
	"whoami":       helperWhoami,
	"exit":         helperExit,
	"exec":         helperExec,
	"sleep":        helperSleep,
	"chroot":       helperChroot,
	"probe":        helperProbe,
	"credential":   helperCredential,
	"flood":        helperFlood,
	"stream":       helperStream,
	"detour":       helperDetour,
	"serve":        helperServe,
	"attack":       helperAttack,
	"bind-connect": helperBindConnect,
	"renew":        helperRenew,
	"fork":         helperFork,
	"dns":          helperDNS,
}

// Main runs the helper the environment names, or the tests and then cleanups. Call it from
// TestMain.
func Main(m *testing.M, cleanups ...func()) {
	if name := os.Getenv(helperEnv); name != "" {
		f, ok := helpers[name]
		if !ok {
			fmt.Fprintf(os.Stderr, "unknown test helper %q\n", name)
			os.Exit(2)
		}
		switch os.Getenv(netnsEnv) {
		case "":
		case "thread":
			// Only one thread, not the process's first, joins the namespace (StartStreamInThread):
			// /proc/PID/ns/net still names the first thread's.
			runtime.LockOSThread() // this goroutine keeps the first thread
			code := make(chan int)
			go func() {
				runtime.LockOSThread()
				if unix.Gettid() == unix.Getpid() {
					fmt.Fprintln(os.Stderr, "the helper's thread is the process's first")
					code <- 2
					return
				}
				if err := unix.Setns(3, unix.CLONE_NEWNET); err != nil {
					fmt.Fprintln(os.Stderr, "joining the network namespace:", err)
					code <- 2
					return
				}
				code <- f(os.Args[1:])
			}()
			os.Exit(<-code)
		default:
			// The helper's sockets are made on this goroutine, locked to a thread in the
			// network namespace passed as descriptor 3 (StartStreamIn).
			runtime.LockOSThread()
			if err := unix.Setns(3, unix.CLONE_NEWNET); err != nil {
				fmt.Fprintln(os.Stderr, "joining the network namespace:", err)
				os.Exit(2)
			}
		}
		os.Exit(f(os.Args[1:]))
	}
	code := m.Run()
	writeFaults(os.Stdout)
	for _, c := range cleanups {
		c()
	}
	if agentBinary.dir != "" {
		os.RemoveAll(agentBinary.dir)
	}
	os.Exit(code)
}

// Command returns a command that runs helper with args in the test binary (AgentBinary), born inside
// the cgroup at cgroupPath (clone3 with CLONE_INTO_CGROUP: it never runs anywhere else).
func Command(t testing.TB, cgroupPath, helper string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(AgentBinary(t), args...)
	cmd.Env = append(os.Environ(), helperEnv+"="+helper)
	cmd.Stderr = os.Stderr
	if cgroupPath != "" {
		dir, err := os.Open(cgroupPath)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { dir.Close() })
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	}
	return cmd
}

// Start starts the program name with args born inside the cgroup at cgroupPath
// (CLONE_INTO_CGROUP) and kills it, by PID, when the test ends.
func Start(t testing.TB, cgroupPath, name string, args ...string) *exec.Cmd {
	t.Helper()
	dir, err := os.Open(cgroupPath)
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	cmd := exec.Command(name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: int(dir.Fd())}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

// Run runs helper in the cgroup and returns its output lines.
func Run(t testing.TB, cgroupPath, helper string, args ...string) []string {
	t.Helper()
	out, err := Command(t, cgroupPath, helper, args...).Output()
	if err != nil {
		t.Fatalf("helper %s %v: %v", helper, args, err)
	}
	return strings.Fields(strings.TrimSpace(string(out)))
}

// Dial runs the dial helper in the cgroup for each "network address" pair and returns one result
// per pair: "ok", "eperm", or "error:..." for anything else.
func Dial(t testing.TB, cgroupPath string, targets ...string) []string {
	t.Helper()
	return Run(t, cgroupPath, "dial", targets...)
}

// DialIn is Dial from inside the network namespace of host h (as a pod's process).
func DialIn(t testing.TB, h *Host, cgroupPath string, targets ...string) []string {
	t.Helper()
	out, err := InHost(t, h, Command(t, cgroupPath, "dial", targets...)).Output()
	if err != nil {
		t.Fatalf("helper dial %v in %v's namespace: %v", targets, h.V4, err)
	}
	return strings.Fields(strings.TrimSpace(string(out)))
}

// InHost has the helper cmd run inside the network namespace of host h, and returns it.
func InHost(t testing.TB, h *Host, cmd *exec.Cmd) *exec.Cmd {
	t.Helper()
	ns, err := unix.Dup(h.NetNS())
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(ns), "netns")
	t.Cleanup(func() { f.Close() })
	cmd.ExtraFiles = []*os.File{f}
	cmd.Env = append(cmd.Env, netnsEnv+"=1")
	return cmd
}

// Result classifies the outcome of a connect or send.
func Result(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, syscall.EPERM):
		return "eperm"
	}
	return "error:" + strings.ReplaceAll(err.Error(), " ", "_")
}

// dialOne connects (tcp, udp, unix, unixgram) or sends an unconnected datagram (udpsend to
// host:port, unixgramsend to a path), exercising connect or sendmsg hooks respectively.
func dialOne(network, address string) error {
	switch network {
	case "udpsend":
		c, err := net.ListenPacket("udp", ":0")
		if err != nil {
			return err
		}
		defer c.Close()
		ua, err := net.ResolveUDPAddr("udp", address)
		if err != nil {
			return err
		}
		_, err = c.WriteTo([]byte("x"), ua)
		return err
	case "tcp4mapped", "udp4mapped":
		return dialMapped(network, address)
	case "socket":
		return socketOf(address)
	case "unixgramsend":
		fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_DGRAM, 0)
		if err != nil {
			return err
		}
		defer syscall.Close(fd)
		return syscall.Sendto(fd, []byte("x"), 0, &syscall.SockaddrUnix{Name: address})
	}
	c, err := net.DialTimeout(network, address, 2*time.Second)
	if err != nil {
		return err
	}
	if network == "udp" || network == "unixgram" {
		_, err = c.Write([]byte("x"))
	}
	c.Close()
	return err
}

// dialMapped connects a dual-stack AF_INET6 socket to an IPv4 address written as
// ::ffff:a.b.c.d, the form a v4-mapped bypass would use.
func dialMapped(network, address string) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return err
	}
	typ := syscall.SOCK_STREAM
	if network == "udp4mapped" {
		typ = syscall.SOCK_DGRAM
	}
	fd, err := syscall.Socket(syscall.AF_INET6, typ, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	if err := syscall.SetsockoptInt(fd, syscall.IPPROTO_IPV6, syscall.IPV6_V6ONLY, 0); err != nil {
		return err
	}
	mapped := netip.AddrFrom16(ap.Addr().As16())
	return syscall.Connect(fd, &syscall.SockaddrInet6{Port: int(ap.Port()), Addr: mapped.As16()})
}

// socketOf creates (and closes) a socket of the kind named: raw4, packet, icmp4, tcp4, udp6,
// mptcp4 (IPPROTO_MPTCP, which Go's listeners try first).
func socketOf(kind string) error {
	args := map[string][3]int{
		"raw4":   {syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_ICMP},
		"packet": {syscall.AF_PACKET, syscall.SOCK_RAW, 0},
		"icmp4":  {syscall.AF_INET, syscall.SOCK_DGRAM, syscall.IPPROTO_ICMP},
		"tcp4":   {syscall.AF_INET, syscall.SOCK_STREAM, 0},
		"udp6":   {syscall.AF_INET6, syscall.SOCK_DGRAM, 0},
		"mptcp4": {syscall.AF_INET, syscall.SOCK_STREAM, 262},
	}
	a, ok := args[kind]
	if !ok {
		return fmt.Errorf("unknown socket kind %q", kind)
	}
	fd, err := syscall.Socket(a[0], a[1], a[2])
	if err != nil {
		return err
	}
	return syscall.Close(fd)
}

// helperDial: args are network, address pairs; prints one result per pair. The pair "sleep
// DURATION" waits (and prints "slept"): the dials after it come from a process that was already
// running, as an agent's are.
func helperDial(args []string) int {
	if len(args)%2 != 0 {
		fmt.Fprintln(os.Stderr, "dial: want network address pairs")
		return 2
	}
	for i := 0; i < len(args); i += 2 {
		if args[i] == "sleep" {
			d, err := time.ParseDuration(args[i+1])
			if err != nil {
				fmt.Fprintln(os.Stderr, "dial:", err)
				return 2
			}
			time.Sleep(d)
			fmt.Println("slept")
			continue
		}
		fmt.Println(Result(dialOne(args[i], args[i+1])))
	}
	return 0
}

// helperLoop connects UDP sockets to each address in turn until stdin closes, printing
// "index result" for every connect. UDP connect sends nothing, so it only exercises the hook.
func helperLoop(args []string) int {
	stop := make(chan struct{})
	go func() {
		bufio.NewReader(os.Stdin).ReadString('\n')
		close(stop)
	}()
	w := bufio.NewWriter(os.Stdout)
	defer w.Flush()
	for {
		for i, a := range args {
			select {
			case <-stop:
				return 0
			default:
			}
			c, err := net.Dial("udp", a)
			if err == nil {
				c.Close()
			}
			fmt.Fprintf(w, "%d %s\n", i, Result(err))
		}
	}
}

// helperTCPLoop connects over TCP to each address in turn, every 2ms, until stdin closes; then
// prints one line per address: "ADDRESS ok=N eperm=N other=N".
func helperTCPLoop(args []string) int {
	stop := make(chan struct{})
	go func() {
		bufio.NewReader(os.Stdin).ReadString('\n')
		close(stop)
	}()
	counts := make([]map[string]int, len(args))
	for i := range counts {
		counts[i] = map[string]int{}
	}
	for running := true; running; {
		for i, a := range args {
			res := Result(dialOne("tcp", a))
			if res != "ok" && res != "eperm" {
				res = "other"
			}
			counts[i][res]++
		}
		select {
		case <-stop:
			running = false
		case <-time.After(2 * time.Millisecond):
		}
	}
	for i, a := range args {
		fmt.Printf("%s ok=%d eperm=%d other=%d\n", a, counts[i]["ok"], counts[i]["eperm"], counts[i]["other"])
	}
	return 0
}

// helperExec replaces the process with args[0] (argv args); a copy of the test binary then runs
// the exit helper. If exec returns, it prints why.
func helperExec(args []string) int {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, helperEnv+"=") {
			env = append(env, kv)
		}
	}
	err := syscall.Exec(args[0], args, append(env, helperEnv+"=exit"))
	fmt.Println(Result(err))
	return 0
}

// helperExit exits with the status in args[1] (0 when absent): argv[0] is the program name.
func helperExit(args []string) int {
	code := 0
	if len(args) > 0 {
		fmt.Sscan(args[len(args)-1], &code)
	}
	return code
}

// SelfCopy copies the test binary to a new file (a different inode: a different executable for
// tether) in a directory every user can read, and removes it at test end.
func SelfCopy(t testing.TB) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir, err := os.MkdirTemp("", "tether-test-bin")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	path := dir + "/helper"
	if err := os.WriteFile(path, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

var agentBinary struct {
	once      sync.Once
	dir, path string
	err       error
}

// AgentBinary is a copy of the test binary that any user may run (launched agents run as uids of
// their own, and the test binary is in a directory only root may read): made once per test
// process and removed when it ends (Main).
func AgentBinary(t testing.TB) string {
	t.Helper()
	agentBinary.once.Do(func() {
		self, err := os.Executable()
		if err != nil {
			agentBinary.err = err
			return
		}
		if agentBinary.dir, err = os.MkdirTemp("", "tether-test-agent"); err != nil {
			agentBinary.err = err
			return
		}
		os.Chmod(agentBinary.dir, 0o755)
		b, err := os.ReadFile(self)
		if err == nil {
			agentBinary.path = filepath.Join(agentBinary.dir, "agent")
			err = os.WriteFile(agentBinary.path, b, 0o755)
		}
		agentBinary.err = err
	})
	if agentBinary.err != nil {
		t.Fatal(agentBinary.err)
	}
	return agentBinary.path
}

// helperSpawn runs the helper named by args[0] with args[1:] as a child process (the test binary
// again) and copies its output: a two-process chain inside the agent.
func helperSpawn(args []string) int {
	self, err := os.Executable()
	if err != nil {
		fmt.Println(Result(err))
		return 1
	}
	cmd := exec.Command(self, args[1:]...)
	cmd.Env = append(os.Environ(), helperEnv+"="+args[0])
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Println(Result(err))
	}
	return 0
}

// helperWhoami prints "uid gid CapBnd SigIgn" (the capability bounding set and the ignored
// signals, hex, from /proc).
func helperWhoami([]string) int {
	fields := map[string]string{"CapBnd:": "?", "SigIgn:": "?"}
	if b, err := os.ReadFile("/proc/self/status"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			for k := range fields {
				if v, ok := strings.CutPrefix(line, k); ok {
					fields[k] = strings.TrimSpace(v)
				}
			}
		}
	}
	fmt.Println(os.Getuid(), os.Getgid(), fields["CapBnd:"], fields["SigIgn:"])
	return 0
}

// helperCredential prints the agent's task credential (the file TETHER_TASK_CREDENTIAL_FILE
// names) and then, for each line read from stdin, prints it again; it ends when stdin closes.
func helperCredential([]string) int {
	in := bufio.NewReader(os.Stdin)
	for {
		b, err := os.ReadFile(os.Getenv("TETHER_TASK_CREDENTIAL_FILE"))
		if err != nil {
			fmt.Println(Result(err))
		} else {
			fmt.Println(strings.TrimSpace(string(b)))
		}
		if _, err := in.ReadString('\n'); err != nil {
			return 0
		}
	}
}

// helperSleep blocks until stdin closes.
// helperChroot changes its root to args[0] (a container's root, or an agent's chroot), then
// waits as helperSleep does.
func helperChroot(args []string) int {
	if err := syscall.Chroot(args[0]); err != nil {
		fmt.Fprintln(os.Stderr, "chroot:", err)
		return 1
	}
	if err := os.Chdir("/"); err != nil {
		return 1
	}
	fmt.Println("ready")
	return helperSleep(nil)
}

func helperSleep([]string) int {
	bufio.NewReader(os.Stdin).ReadString('\n')
	return 0
}

// helperProbe answers requests read from stdin, one per line, with one result line each (see
// Result; an exec also answers "killed" when the kernel killed the new program):
//
//	udp|udp4mapped ADDRESS:PORT           connect a UDP socket (sends nothing: any address will do)
//	tcp|tcp4mapped|udpsend ADDRESS:PORT   connect, or send one datagram: loopback only (anything else is refused)
//	unix PATH|@NAME                       connect a unix stream socket
//	bindtcp|bindudp ADDRESS:PORT          bind (and listen, tcp) and close
//	exec PATH                                     run PATH (a copy of the test binary runs the exit helper)
//	dns NAME                                      ask for NAME's A records (ok: answered, eperm: REFUSED)
func helperProbe([]string) int {
	in := bufio.NewScanner(os.Stdin)
	out := bufio.NewWriter(os.Stdout)
	for in.Scan() {
		kind, arg, _ := strings.Cut(in.Text(), " ")
		var res string
		switch kind {
		case "exec":
			res = execResult(arg)
		case "udp":
			res = Result(connectUDP(arg))
		case "udp4mapped", "unix": // connect only: nothing is sent
			res = Result(dialOne(kind, arg))
		case "bindtcp", "bindudp": // bind, and close at once
			res = Result(bindOne(strings.TrimPrefix(kind, "bind"), arg))
		case "dns": // a query for arg to a resolver that exists nowhere: only tether's proxy answers
			res = dnsResult(arg)
		case "tcp", "tcp4mapped", "udpsend":
			// These send: only ever to loopback.
			if ap, err := netip.ParseAddrPort(arg); err != nil || !ap.Addr().IsLoopback() {
				res = "error:refused:not_a_loopback_address"
				break
			}
			res = Result(dialOne(kind, arg))
		default:
			res = "error:unknown_request"
		}
		fmt.Fprintln(out, res)
		out.Flush()
	}
	return 0
}

// execResult runs path with no arguments and classifies how it went.
func execResult(path string) string {
	cmd := exec.Command(path)
	cmd.Env = []string{helperEnv + "=exit"}
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL {
			return "killed"
		}
	}
	return Result(err)
}

// bindOne binds a socket of network (tcp: listening) to address and closes it.
func bindOne(network, address string) error {
	if network == "udp" {
		c, err := net.ListenPacket("udp", address)
		if err == nil {
			c.Close()
		}
		return err
	}
	l, err := net.Listen("tcp", address)
	if err == nil {
		l.Close()
	}
	return err
}

// connectUDP connects a UDP socket to address without sending anything.
func connectUDP(address string) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return err
	}
	family := syscall.AF_INET6
	var sa syscall.Sockaddr = &syscall.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	if ap.Addr().Is4() {
		family, sa = syscall.AF_INET, &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	}
	fd, err := syscall.Socket(family, syscall.SOCK_DGRAM, 0)
	if err != nil {
		return err
	}
	defer syscall.Close(fd)
	return syscall.Connect(fd, sa)
}

// helperFlood connects one UDP socket to args[1] (IPv4 address:port) over and over, as fast as it
// can, for the duration args[0]; then prints "eperm=N other=N". A connect tether denies sends
// nothing and leaves the socket as it was.
func helperFlood(args []string) int {
	if len(args) != 2 {
		fmt.Fprintln(os.Stderr, "flood: want DURATION ADDRESS:PORT")
		return 2
	}
	d, err := time.ParseDuration(args[0])
	ap, err2 := netip.ParseAddrPort(args[1])
	if err != nil || err2 != nil || !ap.Addr().Is4() {
		fmt.Fprintln(os.Stderr, "flood: want DURATION IPV4:PORT")
		return 2
	}
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "flood:", err)
		return 1
	}
	sa := &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	eperm, other := 0, 0
	for end := time.Now().Add(d); time.Now().Before(end); {
		for range 256 {
			if err := syscall.Connect(fd, sa); errors.Is(err, syscall.EPERM) {
				eperm++
			} else {
				other++
			}
		}
	}
	fmt.Printf("eperm=%d other=%d\n", eperm, other)
	return 0
}

// helperFork waits for a line on stdin, then forks a child that exits at once (no exec) and
// prints how the child ended: "exited" or "killed" (SIGKILL before it ran).
func helperFork(args []string) int {
	bufio.NewReader(os.Stdin).ReadString('\n')
	runtime.LockOSThread()
	pid, _, errno := syscall.RawSyscall(syscall.SYS_FORK, 0, 0, 0)
	if errno != 0 {
		fmt.Fprintln(os.Stderr, "fork:", errno)
		return 1
	}
	if pid == 0 {
		syscall.RawSyscall(syscall.SYS_EXIT_GROUP, 0, 0, 0) // the child: nothing of Go runs
	}
	var ws syscall.WaitStatus
	if _, err := syscall.Wait4(int(pid), &ws, 0, nil); err != nil {
		fmt.Fprintln(os.Stderr, "fork: wait:", err)
		return 1
	}
	if ws.Signaled() && ws.Signal() == syscall.SIGKILL {
		fmt.Println("killed")
	} else {
		fmt.Println("exited")
	}
	return 0
}
