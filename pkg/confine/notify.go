package confine

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"unsafe"

	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/sys/unix"
)

// A Refusal is a system call the seccomp filter refused, as the launcher saw it.
type Refusal struct {
	PID     uint32 // in the launcher's PID namespace
	Syscall string // its name, or "syscall N"
	Args    [6]uint64
	Errno   unix.Errno // what the call returned
}

func (r Refusal) String() string {
	if r.Syscall == "socket" {
		return fmt.Sprintf("socket(family %d, type %d, protocol %d)", r.Args[0], r.Args[1], r.Args[2])
	}
	if r.Syscall == "unshare" || r.Syscall == "clone" {
		return fmt.Sprintf("%s(flags %#x)", r.Syscall, r.Args[0])
	}
	return r.Syscall
}

// The kernel's struct seccomp_notif and struct seccomp_notif_resp.
type seccompNotif struct {
	ID    uint64
	PID   uint32
	Flags uint32
	Data  struct {
		Nr   int32
		Arch uint32
		IP   uint64
		Args [6]uint64
	}
}

type seccompNotifResp struct {
	ID    uint64
	Val   int64
	Error int32
	Flags uint32
}

var syscallNames = sync.OnceValue(func() map[int]string {
	names := map[int]string{}
	if native, err := arch.GetInfo(""); err == nil {
		for name, nr := range native.SyscallNames {
			names[nr] = name
		}
	}
	return names
})

// Supervise answers the notifications of a filter loadFilter installed with notify: each
// refused call fails with the error the filter without a listener returns (EAFNOSUPPORT for a
// socket, EPERM for the rest; never is a call let through), then record sees it. It returns
// once no process uses the filter any more, or the listener fails.
func Supervise(listener *os.File, record func(Refusal)) error {
	fd := int(listener.Fd())
	for {
		pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if _, err := unix.Poll(pfd, -1); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return fmt.Errorf("waiting for seccomp notifications: %w", err)
		}
		if pfd[0].Revents&unix.POLLIN == 0 {
			// POLLHUP: the last process under the filter is gone.
			return nil
		}
		var n seccompNotif
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SECCOMP_IOCTL_NOTIF_RECV, uintptr(unsafe.Pointer(&n))); errno != 0 {
			if errno == unix.EINTR || errno == unix.ENOENT { // ENOENT: the caller died waiting
				continue
			}
			return fmt.Errorf("receiving a seccomp notification: %w", errno)
		}
		r := Refusal{PID: n.PID, Args: n.Data.Args, Errno: unix.EPERM}
		var ok bool
		if r.Syscall, ok = syscallNames()[int(n.Data.Nr)]; !ok {
			r.Syscall = fmt.Sprintf("syscall %d", n.Data.Nr)
		}
		if r.Syscall == "socket" {
			r.Errno = unix.EAFNOSUPPORT
		}
		resp := seccompNotifResp{ID: n.ID, Error: -int32(r.Errno)}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SECCOMP_IOCTL_NOTIF_SEND, uintptr(unsafe.Pointer(&resp))); errno != 0 && errno != unix.ENOENT {
			return fmt.Errorf("answering a seccomp notification: %w", errno)
		}
		record(r)
	}
}
