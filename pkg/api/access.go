package api

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/identity"
)

// Who calls: the kernel's word for the process on the other end of the socket, and what the
// access policy lets it do.

// Caller is the process on the other end of a connection, as the kernel reports it.
type Caller struct {
	PID    int32
	UID    uint32
	GID    uint32
	Groups []uint32
}

// Policy decides who may call what.
type Policy struct {
	AdminUIDs []uint32
	AdminGIDs []uint32
	Launch    []LaunchRule
	// Confined reports whether the process runs inside an agent (or elsewhere below an agent
	// parent). Such callers are refused every verb.
	Confined func(pid int32) bool
}

// LaunchRule lets UIDs or GIDs launch agents whose SPIFFE ID matches one of IDs; Root and
// Unconfined let them launch those as uid 0 and with the sandbox off.
type LaunchRule struct {
	IDs        []string
	UIDs       []uint32
	GIDs       []uint32
	Root       bool
	Unconfined bool
}

func (c Caller) inGroup(gids []uint32) bool {
	return slices.Contains(gids, c.GID) || slices.ContainsFunc(c.Groups, func(g uint32) bool { return slices.Contains(gids, g) })
}

// IsAdmin reports whether c may call every verb. Root always may.
func (p *Policy) IsAdmin(c Caller) bool {
	return c.UID == 0 || slices.Contains(p.AdminUIDs, c.UID) || c.inGroup(p.AdminGIDs)
}

// MayLaunch reports whether c may launch an agent with the SPIFFE ID id.
func (p *Policy) MayLaunch(c Caller, id string) bool {
	return p.IsAdmin(c) || p.ruleFor(c, id, func(LaunchRule) bool { return true })
}

// MayLaunchRoot reports whether a launch rule lets c launch id as uid 0. Being an admin is not
// enough: root agents are a choice an admin writes down.
func (p *Policy) MayLaunchRoot(c Caller, id string) bool {
	return p.ruleFor(c, id, func(r LaunchRule) bool { return r.Root })
}

// MayLaunchUnconfined reports whether a launch rule lets c launch id with the sandbox off.
func (p *Policy) MayLaunchUnconfined(c Caller, id string) bool {
	return p.ruleFor(c, id, func(r LaunchRule) bool { return r.Unconfined })
}

// ruleFor reports whether a launch rule for c and id has what want wants.
func (p *Policy) ruleFor(c Caller, id string, want func(LaunchRule) bool) bool {
	for _, r := range p.Launch {
		if want(r) && (slices.Contains(r.UIDs, c.UID) || c.inGroup(r.GIDs)) &&
			slices.ContainsFunc(r.IDs, func(pat string) bool { return identity.Match(pat, id) }) {
			return true
		}
	}
	return false
}

type callerKey struct{}

type connKey struct{}

func caller(r *http.Request) Caller { return r.Context().Value(callerKey{}).(Caller) }

// knownCaller is the caller the kernel named for r's connection, or false with the request
// refused when it could not be read.
func knownCaller(w http.ResponseWriter, r *http.Request) (Caller, bool) {
	c, ok := r.Context().Value(callerKey{}).(Caller)
	if !ok {
		refuse(w, http.StatusForbidden, errors.New("the caller's credentials could not be read"))
	}
	return c, ok
}

// guard refuses requests without credentials or from inside agents.
func (s *Server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, ok := knownCaller(w, r)
		if !ok {
			return
		}
		if p := s.policy(); p.Confined != nil && confined(r, c, p.Confined) {
			s.log.Warn("API call from inside an agent refused", "pid", c.PID, "uid", c.UID, "path", r.URL.Path)
			refuse(w, http.StatusForbidden, errors.New("processes inside agents may not use the control API"))
			return
		}
		next.ServeHTTP(w, r)
	})
}

// soPeerPIDFD is SO_PEERPIDFD (Linux 6.5): a pidfd of the peer as it connected.
const soPeerPIDFD = 77

// confined asks whether the peer runs inside an agent. The answer is about the process that
// connected only if that process still exists after the question, which its pidfd tells (a pid
// alone could have been reused by then). Without SO_PEERPIDFD the pid is trusted.
func confined(r *http.Request, c Caller, isConfined func(int32) bool) bool {
	conn, _ := r.Context().Value(connKey{}).(*net.UnixConn)
	pidfd := -1
	if conn != nil {
		if raw, err := conn.SyscallConn(); err == nil {
			raw.Control(func(fd uintptr) {
				if v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, soPeerPIDFD); err == nil {
					pidfd = v
				}
			})
		}
	}
	if pidfd >= 0 {
		defer unix.Close(pidfd)
	}
	if isConfined(c.PID) {
		return true
	}
	// Signal 0 only asks whether the process exists: ESRCH means the connecting process is gone
	// and what was read may be another's; EPERM (another user's process, without CAP_KILL)
	// means it is there.
	if pidfd >= 0 && errors.Is(unix.PidfdSendSignal(pidfd, 0, nil, 0), unix.ESRCH) {
		return true
	}
	return false
}

// peer reads the credentials the kernel recorded for the other end of a unix connection.
func peer(c net.Conn) (Caller, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Caller{}, fmt.Errorf("not a unix connection: %T", c)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Caller{}, err
	}
	var caller Caller
	var serr error
	err = raw.Control(func(fd uintptr) {
		var cred *unix.Ucred
		if cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); serr != nil {
			return
		}
		caller = Caller{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}
		caller.Groups, serr = peerGroups(int(fd))
	})
	return caller, errors.Join(err, serr)
}

// peerGroups reads SO_PEERGROUPS: the supplementary groups of the peer when it connected.
func peerGroups(fd int) ([]uint32, error) {
	buf := make([]uint32, 64)
	for {
		n := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		switch errno {
		case 0:
			return buf[:n/4], nil
		case unix.ERANGE:
			buf = make([]uint32, n/4+1)
		default:
			return nil, fmt.Errorf("SO_PEERGROUPS: %w", errno)
		}
	}
}
