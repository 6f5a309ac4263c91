package privtest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// What an agent that wants out tries, one per run of the attack helper: each prints one line,
// "ok ..." when the attack worked, else "fail ERRNO message". The tests run them inside agents
// with the launcher's confinement off (the negative control: they must work) and on (they must
// not).
var attacks = map[string]func(args []string) (string, error){
	"pin-write":      attackPinWrite,
	"link-detach":    attackLinkDetach,
	"migrate":        attackMigrate,
	"nest":           attackNest,
	"rewrite":        attackRewrite,
	"kill":           attackKill,
	"userns-connect": attackUsernsConnect,
	"read":           attackRead,
	"ptrace":         attackPtrace,
	"pidfd-getfd":    attackPidfdGetfd,
	"raw-socket":     attackRawSocket,
	"move":           attackMove,
	"bind":           attackBind,
	"userns":         attackUserns,
	"unix-read":      attackUnixRead,
	"bpf":            attackBPF,
}

// helperAttack runs the attack args[0] names with args[1:].
func helperAttack(args []string) int {
	if len(args) == 0 || attacks[args[0]] == nil {
		fmt.Println("unknown attack", args)
		return 2
	}
	ok, err := attacks[args[0]](args[1:])
	if err != nil {
		fmt.Println("fail", errnoName(err), err)
		return 0
	}
	fmt.Println("ok", ok)
	return 0
}

// bpfObjGet opens a pinned BPF object (BPF_OBJ_GET needs only the pin's file mode).
func bpfObjGet(path string) (int, error) {
	p, err := unix.BytePtrFromString(path)
	if err != nil {
		return -1, err
	}
	var attr [16]byte // union bpf_attr: pathname (u64), bpf_fd, file_flags
	*(*uint64)(unsafe.Pointer(&attr[0])) = uint64(uintptr(unsafe.Pointer(p)))
	fd, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_OBJ_GET, uintptr(unsafe.Pointer(&attr[0])), uintptr(len(attr)))
	runtime.KeepAlive(p)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

// attackPinWrite opens tether's cgroup binding map by its pin and writes (then deletes) an entry
// in it: with that, an agent rebinds any cgroup, its own included.
func attackPinWrite(args []string) (string, error) {
	fd, err := bpfObjGet(filepath.Join(args[0], "tether_cgroups"))
	if err != nil {
		return "", fmt.Errorf("BPF_OBJ_GET: %w", err)
	}
	defer unix.Close(fd)
	// Its key is a cgroup id (8 bytes): one no cgroup has; the value is whatever size the map
	// says.
	var info [96]byte // struct bpf_map_info: type, id, key_size, value_size, ...
	var attr [16]byte // info: bpf_fd (u32), info_len (u32), info (u64)
	*(*uint32)(unsafe.Pointer(&attr[0])) = uint32(fd)
	*(*uint32)(unsafe.Pointer(&attr[4])) = uint32(len(info))
	*(*uint64)(unsafe.Pointer(&attr[8])) = uint64(uintptr(unsafe.Pointer(&info[0])))
	if _, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_OBJ_GET_INFO_BY_FD, uintptr(unsafe.Pointer(&attr[0])), uintptr(len(attr))); errno != 0 {
		return "", fmt.Errorf("BPF_OBJ_GET_INFO_BY_FD: %w", errno)
	}
	valueSize := *(*uint32)(unsafe.Pointer(&info[12]))
	key := uint64(1<<63 | 0x7e7e7e)
	value := make([]byte, valueSize)
	elem := func(cmd uintptr, withValue bool) error {
		var a [32]byte // map_fd (u32), pad, key (u64), value (u64), flags (u64)
		*(*uint32)(unsafe.Pointer(&a[0])) = uint32(fd)
		*(*uint64)(unsafe.Pointer(&a[8])) = uint64(uintptr(unsafe.Pointer(&key)))
		if withValue {
			*(*uint64)(unsafe.Pointer(&a[16])) = uint64(uintptr(unsafe.Pointer(&value[0])))
		}
		_, _, errno := unix.Syscall(unix.SYS_BPF, cmd, uintptr(unsafe.Pointer(&a[0])), uintptr(len(a)))
		runtime.KeepAlive(value)
		if errno != 0 {
			return errno
		}
		return nil
	}
	if err := elem(unix.BPF_MAP_UPDATE_ELEM, true); err != nil {
		return "", fmt.Errorf("BPF_MAP_UPDATE_ELEM: %w", err)
	}
	if err := elem(unix.BPF_MAP_DELETE_ELEM, false); err != nil {
		return "", fmt.Errorf("BPF_MAP_DELETE_ELEM: %w", err)
	}
	return "wrote tether_cgroups", nil
}

// attackLinkDetach detaches every cgroup link tether pinned (BPF_LINK_DETACH checks no
// capability): every agent on the node is unhooked.
func attackLinkDetach(args []string) (string, error) {
	pins, _ := filepath.Glob(filepath.Join(args[0], "links", "cg-*"))
	if len(pins) == 0 {
		if _, err := os.Stat(filepath.Join(args[0], "links")); err != nil {
			return "", err
		}
		return "", errors.New("no cgroup links pinned")
	}
	for _, pin := range pins {
		fd, err := bpfObjGet(pin)
		if err != nil {
			return "", fmt.Errorf("BPF_OBJ_GET: %w", err)
		}
		var attr [4]byte // link_detach: link_fd
		*(*uint32)(unsafe.Pointer(&attr[0])) = uint32(fd)
		_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_LINK_DETACH, uintptr(unsafe.Pointer(&attr[0])), uintptr(len(attr)))
		unix.Close(fd)
		if errno != 0 {
			return "", fmt.Errorf("BPF_LINK_DETACH: %w", errno)
		}
	}
	return fmt.Sprintf("detached %d links", len(pins)), nil
}

// attackMigrate moves the process into the cgroup args[0] (not an agent's), then makes the
// connect args[1] args[2] the agent's rules deny: "ok moved <dial result>".
func attackMigrate(args []string) (string, error) {
	if err := os.WriteFile(filepath.Join(args[0], "cgroup.procs"), []byte("0"), 0); err != nil {
		return "", err
	}
	return "moved " + Result(dialOne(args[1], args[2])), nil
}

// attackMove moves process args[1] into the cgroup args[0] (the mover is not the process moved).
func attackMove(args []string) (string, error) {
	if err := os.WriteFile(filepath.Join(args[0], "cgroup.procs"), []byte(args[1]), 0); err != nil {
		return "", err
	}
	return "moved " + args[1], nil
}

// attackBind binds a socket of network args[0] ("tcp" or "udp") to address args[1]: "ok bound".
func attackBind(args []string) (string, error) {
	if args[0] == "udp" {
		c, err := net.ListenPacket("udp", args[1])
		if err != nil {
			return "", err
		}
		return "bound", c.Close()
	}
	l, err := net.Listen("tcp", args[1])
	if err != nil {
		return "", err
	}
	return "bound", l.Close()
}

// attackUnixRead connects to the unix socket args[0] and reads one line: "ok reached <line>".
func attackUnixRead(args []string) (string, error) {
	c, err := net.DialTimeout("unix", args[0], 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	line, _ := bufio.NewReader(c).ReadString('\n')
	return "reached " + strings.TrimSpace(line), nil
}

// attackUserns starts a child in a new user namespace: "ok userns".
func attackUserns([]string) (string, error) {
	cmd := exec.Command("/proc/self/exe")
	cmd.Env = append(os.Environ(), helperEnv+"=exit")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getuid(), Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getgid(), Size: 1}},
	}
	if err := cmd.Run(); err != nil {
		return "", err
	}
	return "userns", nil
}

// attackBPF creates a BPF map: "ok bpf".
func attackBPF([]string) (string, error) {
	attr := struct{ mapType, keySize, valueSize, maxEntries uint32 }{2 /* BPF_MAP_TYPE_ARRAY */, 4, 4, 1}
	fd, _, errno := unix.Syscall(unix.SYS_BPF, 0 /* BPF_MAP_CREATE */, uintptr(unsafe.Pointer(&attr)), unsafe.Sizeof(attr))
	if errno != 0 {
		return "", errno
	}
	unix.Close(int(fd))
	return "bpf", nil
}

// ownCgroup is the cgroup2 directory of the calling process.
func ownCgroup() (string, error) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", err
	}
	var rel string
	for _, line := range strings.Split(string(b), "\n") {
		if r, ok := strings.CutPrefix(line, "0::"); ok {
			rel = r
		}
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	for _, line := range strings.Split(string(mi), "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		if f := strings.Fields(pre); ok && len(f) > 4 && strings.HasPrefix(post, "cgroup2 ") {
			return filepath.Join(f[4], rel), nil
		}
	}
	return "", errors.New("no cgroup2 mount")
}

// attackNest raises its cgroup's nesting limit, nests 20 cgroups deep, moves there and runs
// args[0] (a program the agent's rules deny), whose exec the hooks no longer attribute.
func attackNest(args []string) (string, error) {
	dir, err := ownCgroup()
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.max.depth"), []byte("max"), 0); err != nil {
		return "", fmt.Errorf("raising cgroup.max.depth: %w", err)
	}
	for range 20 {
		dir = filepath.Join(dir, "n")
		if err := os.Mkdir(dir, 0o755); err != nil {
			return "", fmt.Errorf("nesting: %w", err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte("0"), 0); err != nil {
		return "", fmt.Errorf("moving down: %w", err)
	}
	return "nested, exec " + execResult(args[0]), nil
}

// attackRewrite writes the content of args[1] into args[0], a file the agent may execute (same
// inode, so the same rule), and runs it: "ok <its first line of output>".
func attackRewrite(args []string) (string, error) {
	b, err := os.ReadFile(args[1])
	if err != nil {
		return "", err
	}
	f, err := os.OpenFile(args[0], os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return "", err
	}
	_, err = f.Write(b)
	if err := errors.Join(err, f.Close()); err != nil {
		return "", err
	}
	// Run as this helper binary's whoami, when args[1] is one (a denied copy of it).
	cmd := exec.Command(args[0])
	cmd.Env = append(os.Environ(), helperEnv+"=whoami")
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("running the rewritten file: %w", err)
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return "ran " + line, nil
}

// attackKill checks whether it could signal process args[0] (signal 0: nothing is sent).
func attackKill(args []string) (string, error) {
	pid, err := strconv.Atoi(args[0])
	if err != nil {
		return "", err
	}
	if err := unix.Kill(pid, 0); err != nil {
		return "", err
	}
	return "could signal " + args[0], nil
}

// attackUsernsConnect makes a user and mount namespace (a child: a Go process has threads),
// mounts the socket args[1] over args[0] (a path the agent may connect to), connects to args[0]
// and prints what answers.
func attackUsernsConnect(args []string) (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	cmd := exec.Command(self, args...)
	cmd.Env = append(os.Environ(), helperEnv+"=bind-connect")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER | syscall.CLONE_NEWNS,
		UidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getuid(), Size: 1}},
		GidMappings: []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getgid(), Size: 1}},
	}
	out, err := cmd.Output()
	if err != nil && len(out) > 0 {
		return "", fmt.Errorf("%s: %w", strings.TrimSpace(string(out)), err) // what the child said
	}
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(out)), nil
}

// helperBindConnect is attackUsernsConnect's child, in its own user and mount namespace.
func helperBindConnect(args []string) int {
	if err := unix.Mount(args[1], args[0], "", unix.MS_BIND, ""); err != nil {
		fmt.Println("bind:", Result(err))
		return 1
	}
	c, err := net.DialTimeout("unix", args[0], 2*time.Second)
	if err != nil {
		fmt.Println("connect:", Result(err))
		return 1
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	line, _ := bufio.NewReader(c).ReadString('\n')
	fmt.Println("reached", strings.TrimSpace(line))
	return 0
}

// attackRead reads the file args[0] (another agent's credential).
func attackRead(args []string) (string, error) {
	b, err := os.ReadFile(args[0])
	if err != nil {
		return "", err
	}
	return fmt.Sprintf("read %d bytes", len(b)), nil
}

// attackPtrace attaches to process args[0] (and lets it go).
func attackPtrace(args []string) (string, error) {
	pid, err := strconv.Atoi(args[0])
	if err != nil {
		return "", err
	}
	runtime.LockOSThread() // the tracer is a thread
	if err := unix.PtraceAttach(pid); err != nil {
		return "", err
	}
	var ws unix.WaitStatus
	unix.Wait4(pid, &ws, unix.WALL, nil)
	unix.PtraceDetach(pid)
	return "attached to " + args[0], nil
}

// attackPidfdGetfd takes descriptor args[1] of process args[0].
func attackPidfdGetfd(args []string) (string, error) {
	pid, err := strconv.Atoi(args[0])
	if err != nil {
		return "", err
	}
	fd, err := strconv.Atoi(args[1])
	if err != nil {
		return "", err
	}
	pidfd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return "", fmt.Errorf("pidfd_open: %w", err)
	}
	defer unix.Close(pidfd)
	got, err := unix.PidfdGetfd(pidfd, fd, 0)
	if err != nil {
		return "", fmt.Errorf("pidfd_getfd: %w", err)
	}
	unix.Close(got)
	return fmt.Sprintf("took descriptor %d of %d", fd, pid), nil
}

// attackRawSocket opens a packet socket, whose traffic no address hook sees.
func attackRawSocket([]string) (string, error) {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
	if err != nil {
		return "", err
	}
	unix.Close(fd)
	return "packet socket", nil
}

// helperRenew renews its own agent's task on the agent socket args[0], for args[1] each time,
// every args[2], args[3] times, presenting the credential in TETHER_TASK_CREDENTIAL_FILE (the
// file the last renewal rewrote): one line each, "ok EXPIRES" or "fail why".
func helperRenew(args []string) int {
	interval, _ := time.ParseDuration(args[2])
	n, _ := strconv.Atoi(args[3])
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", args[0])
		},
	}}
	for i := range n {
		if i > 0 {
			time.Sleep(interval)
		}
		var expires time.Time
		var err error
		// The launcher's heartbeats renew the same task: a credential read just before one of
		// them is superseded, and the file already holds the next (as a real agent would, read
		// it again).
		for try := 0; try < 3; try++ {
			var b []byte
			if b, err = os.ReadFile(os.Getenv("TETHER_TASK_CREDENTIAL_FILE")); err != nil {
				err = errors.New(errnoName(err))
				break
			}
			if expires, err = renewSelf(c, strings.TrimSpace(string(b)), args[1]); err == nil || !strings.Contains(err.Error(), "superseded") {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if err != nil {
			fmt.Println("fail", strings.ReplaceAll(err.Error(), "\n", " "))
			continue
		}
		fmt.Println("ok", expires.UTC().Format(time.RFC3339Nano))
	}
	return 0
}

// renewSelf is PUT /v1/self/task on the agent socket, spoken by hand: privtest sits below
// pkg/api (whose packages' tests use it).
func renewSelf(c *http.Client, credential, ttl string) (time.Time, error) {
	body, _ := json.Marshal(map[string]string{"credential": credential, "ttl": ttl})
	req, err := http.NewRequest(http.MethodPut, "http://tetherd/v1/self/task", bytes.NewReader(body))
	if err != nil {
		return time.Time{}, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return time.Time{}, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var out struct {
		ExpiresAt time.Time `json:"expires_at"`
		Error     string    `json:"error"`
	}
	json.Unmarshal(b, &out)
	if resp.StatusCode >= 300 {
		return time.Time{}, fmt.Errorf("%s: %s", resp.Status, out.Error)
	}
	return out.ExpiresAt, nil
}
