package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/confine"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/identity"
	"github.com/tether-sh/tether/pkg/panics"
)

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

// Server serves the API.
type Server struct {
	svc    Service
	policy func() *Policy // read per request: a reload swaps it
	log    *slog.Logger
	srv    *http.Server
}

type callerKey struct{}

// NewServer returns a server for svc; policy is called for every request.
func NewServer(svc Service, policy func() *Policy, log *slog.Logger) *Server {
	s := &Server{svc: svc, policy: policy, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", s.status)
	mux.HandleFunc("GET /v1/agents", s.list)
	mux.HandleFunc("POST /v1/agents", s.register)
	mux.HandleFunc("GET /v1/agents/{slot}", s.get)
	mux.HandleFunc("DELETE /v1/agents/{slot}", s.unregister)
	mux.HandleFunc("PUT /v1/agents/{slot}/mode", s.setMode)
	mux.HandleFunc("PUT /v1/agents/{slot}/killed", s.setKilled)
	mux.HandleFunc("POST /v1/agents/{slot}/task", s.startTask)
	mux.HandleFunc("PUT /v1/agents/{slot}/task", s.renewTask)
	mux.HandleFunc("DELETE /v1/agents/{slot}/task", s.endTask)
	mux.HandleFunc("POST /v1/agents/{slot}/task/approvals", s.addApproval)
	mux.HandleFunc("GET /v1/agents/{slot}/task/credential", s.taskCredential)
	mux.HandleFunc("GET /v1/agents/{slot}/confinement", s.confinement)
	mux.HandleFunc("POST /v1/agents/{slot}/refusals", s.refusal)
	mux.HandleFunc("POST /v1/agents/{slot}/task/heartbeat", s.heartbeat)
	mux.HandleFunc("POST /v1/agents/{slot}/task/handoff", s.handoff)
	mux.HandleFunc("GET /v1/credentials/keys", s.credentialKeys)
	mux.HandleFunc("GET /v1/credentials/revoked", s.revokedCredentials)
	mux.HandleFunc("POST /v1/credentials/verify", s.verifyCredential)
	mux.HandleFunc("GET /v1/events", s.events)
	mux.HandleFunc("POST /v1/kill", s.kill)
	mux.HandleFunc("GET /v1/kills", s.kills)
	mux.HandleFunc("POST /v1/agents/{slot}/resume", s.resume)
	mux.HandleFunc("POST /v1/readmit", s.readmit)
	mux.HandleFunc("POST /v1/policy/reload", s.reloadPolicy)
	mux.HandleFunc("POST /v1/policy/eval", s.evalPolicy)
	mux.HandleFunc("GET /v1/approvals", s.approvals)
	mux.HandleFunc("POST /v1/approvals/{id}/approve", s.approve)
	mux.HandleFunc("POST /v1/approvals/{id}/deny", s.deny)
	s.srv = socketServer(s.guard(mux), log)
	return s
}

// socketServer serves h on a unix socket, each request carrying the caller the kernel names.
func socketServer(h http.Handler, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           recovering(h, log),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			caller, err := peer(c)
			if err != nil {
				log.Warn("reading peer credentials", "error", err)
				return ctx // no caller: the guard refuses every request on this connection
			}
			return context.WithValue(context.WithValue(ctx, callerKey{}, caller), connKey{}, c)
		},
	}
}

type connKey struct{}

// recovering turns a handler's panic into a refusal (500, with the reason) that is counted
// (panics.Counts, a metric), on the control socket and the agents' socket alike.
func recovering(next http.Handler, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					panic(v) // a handler's deliberate abort: net/http ends the connection quietly
				}
				err := panics.Record(BoundaryRequest, v)
				log.Error("API request failed with a panic", "method", r.Method, "path", r.URL.Path, "error", err, "stack", string(err.Stack))
				refuse(w, http.StatusInternalServerError, err)
			}
		}()
		next.ServeHTTP(w, r)
	})
}

// Listen creates the socket at path with mode 0600, or 0660 owned by group. A stale socket
// (nobody answers on it) is replaced; a live one is an error.
func Listen(path, group string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("creating socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("another tetherd is serving %s", path)
		}
		os.Remove(path)
	}
	old := syscall.Umask(0o177)
	l, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	if group != "" {
		g, err := user.LookupGroup(group)
		if err == nil {
			var gid int
			gid, err = strconv.Atoi(g.Gid)
			if err == nil {
				err = os.Chown(path, 0, gid)
			}
		}
		if err == nil {
			err = os.Chmod(path, 0o660)
		}
		if err != nil {
			l.Close()
			return nil, fmt.Errorf("giving %s to group %s: %w", path, group, err)
		}
	}
	return l, nil
}

// Serve serves until Shutdown.
func (s *Server) Serve(l net.Listener) error {
	if err := s.srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Shutdown stops accepting and waits for requests in flight.
func (s *Server) Shutdown(ctx context.Context) error { return s.srv.Shutdown(ctx) }

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

// guard refuses requests without credentials or from inside agents.
func (s *Server) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, ok := r.Context().Value(callerKey{}).(Caller)
		if !ok {
			refuse(w, http.StatusForbidden, errors.New("the caller's credentials could not be read"))
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

// BoundaryRequest counts the API requests whose handler panicked (see panics).
var BoundaryRequest = panics.Declare("api request")

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

// ReservedLabelPrefix marks the labels only admins may set: the shipped policy reads
// tether.dev/mode.
const ReservedLabelPrefix = "tether.dev/"

func caller(r *http.Request) Caller { return r.Context().Value(callerKey{}).(Caller) }

func (s *Server) admin(w http.ResponseWriter, r *http.Request) bool {
	if c := caller(r); !s.policy().IsAdmin(c) {
		refuse(w, http.StatusForbidden, fmt.Errorf("uid %d is not an admin (api.admin_uids, api.admin_gids)", c.UID))
		return false
	}
	return true
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	reply(w, http.StatusOK, s.svc.Status())
}

func (s *Server) list(w http.ResponseWriter, r *http.Request) {
	reply(w, http.StatusOK, s.svc.Agents())
}

// agentAt returns the agent the path names, or answers the request with why there is none.
func (s *Server) agentAt(w http.ResponseWriter, r *http.Request) (agents.Agent, bool) {
	slot, ok := pathSlot(w, r)
	if !ok {
		return agents.Agent{}, false
	}
	a, found := s.svc.Agent(slot)
	if !found {
		refuse(w, http.StatusNotFound, fmt.Errorf("no agent in slot %d", slot))
	}
	return a, found
}

func (s *Server) get(w http.ResponseWriter, r *http.Request) {
	if a, ok := s.agentAt(w, r); ok {
		reply(w, http.StatusOK, a)
	}
}

func (s *Server) register(w http.ResponseWriter, r *http.Request) {
	var req RegisterRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	c := caller(r)
	reg := agents.Registration{SpiffeID: req.SpiffeID, Cgroup: req.Cgroup, Launch: req.Launch, Labels: req.Labels}
	if req.Task != nil {
		spec, err := taskSpec(*req.Task)
		if err != nil {
			refuse(w, http.StatusBadRequest, err)
			return
		}
		reg.Task = &spec
	}
	if req.Launch {
		reg.Selectors = []string{fmt.Sprintf("launch:uid:%d", c.UID)}
	} else {
		reg.Selectors = []string{fmt.Sprintf("admin:uid:%d", c.UID)}
	}
	switch {
	case req.SpiffeID == "":
		refuse(w, http.StatusBadRequest, errors.New("spiffe_id is required"))
		return
	case req.Launch == (req.Cgroup != ""):
		refuse(w, http.StatusBadRequest, errors.New("give either launch: true or an existing cgroup"))
		return
	case !req.Launch && !s.admin(w, r):
		return
	case req.Launch && !s.policy().MayLaunch(c, req.SpiffeID):
		refuse(w, http.StatusForbidden, fmt.Errorf("uid %d may not launch %s (no launch rule allows it)", c.UID, req.SpiffeID))
		return
	}
	// Labels under tether.dev/ steer tether itself (tether.dev/mode: audit): admins only.
	for k := range req.Labels {
		if strings.HasPrefix(k, ReservedLabelPrefix) && !s.policy().IsAdmin(c) {
			refuse(w, http.StatusForbidden, fmt.Errorf("label %q: labels under %s are for admins", k, ReservedLabelPrefix))
			return
		}
	}
	if req.Launch {
		uid := c.UID
		reg.Launcher, reg.LauncherPID, reg.ShareUID = &uid, c.PID, req.ShareUID
		// The command runs as a uid of its own, as root, or as the user the launcher names: any
		// user if the launcher is root, else only itself.
		switch {
		case req.AllowRoot || req.UID != nil && *req.UID == 0:
			if !req.AllowRoot || !s.policy().MayLaunchRoot(c, req.SpiffeID) {
				refuse(w, http.StatusForbidden, fmt.Errorf("an agent running as root needs --allow-root and a launch rule with root: true that lets uid %d launch %s", c.UID, req.SpiffeID))
				return
			}
			reg.UID = 0
		case req.UID == nil:
			reg.DynamicUID = true
		case c.UID == 0 || *req.UID == c.UID:
			reg.UID = *req.UID
		default:
			refuse(w, http.StatusForbidden, fmt.Errorf("uid %d may not launch an agent running as uid %d", c.UID, *req.UID))
			return
		}
	} else if req.UID != nil {
		reg.UID = *req.UID
	}
	a, err := s.svc.Register(reg)
	switch {
	case errors.Is(err, agents.ErrUIDTaken):
		refuse(w, http.StatusConflict, err)
		return
	case err != nil:
		refuse(w, http.StatusBadRequest, err)
		return
	}
	s.log.Info("API registered agent", "slot", a.Slot, "spiffe_id", a.SpiffeID, "caller_uid", c.UID, "caller_pid", c.PID)
	reply(w, http.StatusCreated, a)
}

func (s *Server) unregister(w http.ResponseWriter, r *http.Request) {
	a, ok := s.agentAt(w, r)
	if !ok {
		return
	}
	c := caller(r)
	launcher := a.Launcher != nil && *a.Launcher == c.UID
	if !launcher && !s.admin(w, r) {
		return
	}
	if err := s.svc.Unregister(a.Slot); err != nil {
		refuse(w, http.StatusInternalServerError, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) setMode(w http.ResponseWriter, r *http.Request) {
	slot, ok := pathSlot(w, r)
	if !ok || !s.admin(w, r) {
		return
	}
	var req ModeRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	var mode *dataplane.Mode
	if req.Mode != nil {
		m, err := dataplane.ParseMode(*req.Mode)
		if err != nil {
			refuse(w, http.StatusBadRequest, err)
			return
		}
		mode = &m
	}
	result(w, func() (agents.Agent, error) { return s.svc.SetMode(slot, mode) })
}

func (s *Server) setKilled(w http.ResponseWriter, r *http.Request) {
	slot, ok := pathSlot(w, r)
	if !ok || !s.admin(w, r) {
		return
	}
	var req KilledRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	if req.Killed == nil {
		refuse(w, http.StatusBadRequest, errors.New("killed (true or false) is required"))
		return
	}
	s.log.Info("API killed flag", "slot", slot, "killed", *req.Killed, "caller_uid", caller(r).UID)
	result(w, func() (agents.Agent, error) { return s.svc.SetKilled(slot, *req.Killed) })
}

// result answers with the agent f returns, or with why it failed.
func result(w http.ResponseWriter, f func() (agents.Agent, error)) {
	a, err := f()
	switch {
	case errors.Is(err, agents.ErrNotFound):
		refuse(w, http.StatusNotFound, err)
	case errors.Is(err, agents.ErrTask):
		refuse(w, http.StatusConflict, err)
	case errors.Is(err, agents.ErrInvalid):
		refuse(w, http.StatusBadRequest, err)
	case err != nil:
		refuse(w, http.StatusInternalServerError, err)
	default:
		reply(w, http.StatusOK, a)
	}
}

// adminOrLauncher lets admins and the uid that launched the agent through.
func (s *Server) adminOrLauncher(w http.ResponseWriter, r *http.Request) (agents.Agent, bool) {
	a, ok := s.agentAt(w, r)
	if !ok {
		return a, false
	}
	c := caller(r)
	if a.Launcher != nil && *a.Launcher == c.UID {
		return a, true
	}
	return a, s.admin(w, r)
}

func taskSpec(t TaskRequest) (agents.TaskSpec, error) {
	ttl, err := time.ParseDuration(t.TTL)
	if err != nil {
		return agents.TaskSpec{}, fmt.Errorf("task ttl %q: %w", t.TTL, err)
	}
	return agents.TaskSpec{ID: t.ID, Type: t.Type, Sensitivity: t.Sensitivity, TTL: ttl}, nil
}

func (s *Server) startTask(w http.ResponseWriter, r *http.Request) {
	a, ok := s.adminOrLauncher(w, r)
	if !ok {
		return
	}
	var req TaskRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	spec, err := taskSpec(req)
	if err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	result(w, func() (agents.Agent, error) { return s.svc.StartTask(a.Slot, spec) })
}

func (s *Server) renewTask(w http.ResponseWriter, r *http.Request) {
	a, ok := s.adminOrLauncher(w, r)
	if !ok {
		return
	}
	var req RenewRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	ttl, ok := ttlOf(w, req.TTL)
	if !ok {
		return
	}
	result(w, func() (agents.Agent, error) { return s.svc.RenewTask(a.Slot, ttl) })
}

func (s *Server) endTask(w http.ResponseWriter, r *http.Request) {
	a, ok := s.adminOrLauncher(w, r)
	if !ok {
		return
	}
	result(w, func() (agents.Agent, error) { return s.svc.EndTask(a.Slot) })
}

func (s *Server) addApproval(w http.ResponseWriter, r *http.Request) {
	a, ok := s.agentAt(w, r)
	if !ok || !s.admin(w, r) {
		return
	}
	var req ApprovalRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	ttl, ok := ttlOf(w, req.TTL)
	if !ok {
		return
	}
	by := fmt.Sprintf("uid:%d", caller(r).UID)
	s.log.Info("API approval", "slot", a.Slot, "action", req.Action, "resource", req.Resource, "uses", req.Uses, "by", by)
	result(w, func() (agents.Agent, error) {
		return s.svc.AddApproval(a.Slot, req.Action, req.Resource, by, ttl, req.Uses)
	})
}

func (s *Server) taskCredential(w http.ResponseWriter, r *http.Request) {
	a, ok := s.adminOrLauncher(w, r)
	if !ok {
		return
	}
	cred, err := s.svc.TaskCredential(a.Slot)
	if err != nil {
		refuse(w, credentialStatus(err), err)
		return
	}
	reply(w, http.StatusOK, cred)
}

// confinement is what tetherctl run does to a launched agent: its launcher (or an admin) asks
// for it between registering the agent and starting its command. An unconfined agent (the
// policy says sandbox: off, or ?keep_caps=true for a root agent) needs a launch rule with
// unconfined: true.
func (s *Server) confinement(w http.ResponseWriter, r *http.Request) {
	a, ok := s.adminOrLauncher(w, r)
	if !ok {
		return
	}
	plan, err := s.svc.Confinement(a.Slot)
	if err != nil {
		refuse(w, credentialStatus(err), err)
		return
	}
	c := caller(r)
	if r.URL.Query().Get("keep_caps") == "true" {
		if plan.UID != 0 {
			refuse(w, http.StatusBadRequest, errors.New("--keep-caps is for agents running as root (--allow-root)"))
			return
		}
		plan.KeepCaps = true
	}
	if (plan.Profile == confine.Off || plan.KeepCaps) && !s.policy().MayLaunchUnconfined(c, a.SpiffeID) {
		why := "the policy's grants say sandbox: off"
		if plan.KeepCaps {
			why = "--keep-caps asks for it"
		}
		refuse(w, http.StatusForbidden, fmt.Errorf("agent %d (%s) would run unconfined (%s), and no launch rule with unconfined: true lets uid %d launch it",
			a.Slot, a.SpiffeID, why, c.UID))
		return
	}
	reply(w, http.StatusOK, plan)
}

// refusal records a system call the launcher's seccomp filter refused to its agent (the launcher
// answers the filter's notifications and reports them here).
func (s *Server) refusal(w http.ResponseWriter, r *http.Request) {
	a, ok := s.adminOrLauncher(w, r)
	if !ok {
		return
	}
	var req RefusalRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	if err := req.check(); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	if err := s.svc.RecordRefusal(a.Slot, req); err != nil {
		refuse(w, credentialStatus(err), err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Server) heartbeat(w http.ResponseWriter, r *http.Request) {
	a, ok := s.adminOrLauncher(w, r)
	if !ok {
		return
	}
	var req HeartbeatRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	ttl, ok := ttlOf(w, req.TTL)
	if !ok {
		return
	}
	if req.Credential == "" {
		refuse(w, http.StatusBadRequest, errors.New("credential is required: a heartbeat presents the task's current credential"))
		return
	}
	cred, err := s.svc.Heartbeat(r.Context(), a.Slot, req.Credential, ttl)
	if err != nil {
		s.log.Warn("heartbeat refused", "slot", a.Slot, "caller_uid", caller(r).UID, "error", err)
		refuse(w, credentialStatus(err), err)
		return
	}
	reply(w, http.StatusOK, cred)
}

// handoff hands the agent's task to another agent: the sender's launcher (presenting the
// sender's current credential) or an admin may ask, and must be the receiver's launcher too
// unless an admin.
func (s *Server) handoff(w http.ResponseWriter, r *http.Request) {
	a, ok := s.adminOrLauncher(w, r)
	if !ok {
		return
	}
	var req HandoffRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	ttl, ok := ttlOf(w, req.TTL)
	if !ok {
		return
	}
	if req.Credential == "" {
		refuse(w, http.StatusBadRequest, errors.New("credential is required: the sender's current task credential"))
		return
	}
	c := caller(r)
	to, found := s.svc.Agent(dataplane.Slot(req.To))
	if !found {
		refuse(w, http.StatusNotFound, fmt.Errorf("no agent in slot %d (receiver)", req.To))
		return
	}
	if !(to.Launcher != nil && *to.Launcher == c.UID) && !s.policy().IsAdmin(c) {
		refuse(w, http.StatusForbidden, fmt.Errorf("uid %d neither launched agent %d nor is an admin", c.UID, req.To))
		return
	}
	got, cred, err := s.svc.Handoff(r.Context(), a.Slot, to.Slot, req.Credential, agents.HandoffSpec{Type: req.Type, TTL: ttl})
	if err != nil {
		s.log.Warn("handoff refused", "from", a.Slot, "to", req.To, "caller_uid", c.UID, "error", err)
		refuse(w, credentialStatus(err), err)
		return
	}
	reply(w, http.StatusOK, HandoffResult{Agent: got, Credential: cred})
}

// ttlOf parses a request's ttl, or answers the request with why it cannot.
func ttlOf(w http.ResponseWriter, s string) (time.Duration, bool) {
	ttl, err := time.ParseDuration(s)
	if err != nil {
		refuse(w, http.StatusBadRequest, fmt.Errorf("ttl %q: %w", s, err))
		return 0, false
	}
	return ttl, true
}

// credentialStatus is the HTTP status of a refused credential request.
func credentialStatus(err error) int {
	switch {
	case errors.Is(err, agents.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, agents.ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, credentials.ErrReplayed), errors.Is(err, agents.ErrTask):
		return http.StatusConflict
	case errors.Is(err, credentials.ErrExpired), errors.Is(err, credentials.ErrRevoked), errors.Is(err, credentials.ErrInvalid),
		errors.Is(err, ErrRefused):
		return http.StatusForbidden
	}
	return http.StatusInternalServerError
}

func (s *Server) credentialKeys(w http.ResponseWriter, r *http.Request) {
	reply(w, http.StatusOK, s.svc.CredentialKeys())
}

func (s *Server) revokedCredentials(w http.ResponseWriter, r *http.Request) {
	reply(w, http.StatusOK, s.svc.RevokedCredentials())
}

func (s *Server) verifyCredential(w http.ResponseWriter, r *http.Request) {
	var req VerifyRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	claims, err := s.svc.VerifyCredential(req.Token)
	if err != nil {
		refuse(w, credentialStatus(err), err)
		return
	}
	reply(w, http.StatusOK, claims)
}

// events streams decision records as JSON lines, from now on, until the caller goes away:
// filtered by spiffe_id and verdict. Who may read status may follow them. A reader that does not
// keep up loses records: a line {"dropped": N} says how many.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	id, verdict := r.URL.Query().Get("spiffe_id"), r.URL.Query().Get("verdict")
	sub := s.svc.Subscribe(4096)
	defer sub.Close()
	flusher, _ := w.(http.Flusher)
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	if flusher != nil {
		flusher.Flush()
	}
	enc := json.NewEncoder(w)
	var told uint64
	for {
		select {
		case <-r.Context().Done():
			return
		case d := <-sub.C:
			if n := sub.Dropped(); n > told {
				enc.Encode(map[string]uint64{"dropped": n - told})
				told = n
			}
			if (id != "" && d.SpiffeID != id) || (verdict != "" && d.Verdict != verdict) {
				continue
			}
			if err := enc.Encode(d); err != nil {
				return
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
	}
}

func (s *Server) kill(w http.ResponseWriter, r *http.Request) {
	if !s.admin(w, r) {
		return
	}
	var req KillRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	if strings.TrimSpace(req.Reason) == "" {
		refuse(w, http.StatusBadRequest, errors.New("reason is required: the kill record says why"))
		return
	}
	c := caller(r)
	kills, err := s.svc.Kill(r.Context(), req, fmt.Sprintf("uid:%d", c.UID))
	switch {
	case errors.Is(err, agents.ErrInvalid):
		refuse(w, http.StatusBadRequest, err)
	case errors.Is(err, agents.ErrNotFound) && len(kills) == 0:
		refuse(w, http.StatusNotFound, err)
	case err != nil && len(kills) == 0:
		refuse(w, http.StatusInternalServerError, err)
	default:
		if err != nil {
			s.log.Error("kill partly failed", "error", err)
		}
		reply(w, http.StatusOK, kills)
	}
}

func (s *Server) kills(w http.ResponseWriter, r *http.Request) {
	reply(w, http.StatusOK, s.svc.Kills())
}

func (s *Server) resume(w http.ResponseWriter, r *http.Request) {
	slot, ok := pathSlot(w, r)
	if !ok || !s.admin(w, r) {
		return
	}
	result(w, func() (agents.Agent, error) { return s.svc.Resume(slot) })
}

func (s *Server) readmit(w http.ResponseWriter, r *http.Request) {
	if !s.admin(w, r) {
		return
	}
	var req ReadmitRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	list, err := s.svc.Readmit(req.SpiffeID)
	if err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	reply(w, http.StatusOK, list)
}

func (s *Server) reloadPolicy(w http.ResponseWriter, r *http.Request) {
	if !s.admin(w, r) {
		return
	}
	st, err := s.svc.ReloadPolicy(r.Context(), fmt.Sprintf("tetherctl policy reload (uid %d)", caller(r).UID))
	if err != nil {
		refuse(w, http.StatusUnprocessableEntity, err)
		return
	}
	reply(w, http.StatusOK, st)
}

func (s *Server) evalPolicy(w http.ResponseWriter, r *http.Request) {
	if !s.admin(w, r) {
		return
	}
	var req PolicyEvalRequest
	if err := decode(r, &req); err != nil {
		refuse(w, http.StatusBadRequest, err)
		return
	}
	res, err := s.svc.EvalPolicy(r.Context(), req.Query, req.Input)
	if err != nil {
		refuse(w, http.StatusUnprocessableEntity, err)
		return
	}
	reply(w, http.StatusOK, res)
}

func pathSlot(w http.ResponseWriter, r *http.Request) (dataplane.Slot, bool) {
	n, err := strconv.ParseUint(r.PathValue("slot"), 10, 32)
	if err != nil || n >= dataplane.MaxAgents {
		refuse(w, http.StatusBadRequest, fmt.Errorf("agent slot %q: want a number below %d", r.PathValue("slot"), dataplane.MaxAgents))
		return 0, false
	}
	return dataplane.Slot(n), true
}

// maxBody bounds a request body.
const maxBody = 64 << 10

// decode reads one JSON object into v: unknown fields, trailing data and bodies over 64 KiB are
// errors.
func decode(r *http.Request, v any) error {
	b, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		return fmt.Errorf("reading request: %w", err)
	}
	return DecodeJSON(b, v)
}

// DecodeJSON decodes one JSON object strictly.
func DecodeJSON(b []byte, v any) error {
	if len(b) > maxBody {
		return fmt.Errorf("request body over %d bytes", maxBody)
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if err := d.Decode(v); err != nil {
		return fmt.Errorf("request body: %w", err)
	}
	if d.More() {
		return errors.New("request body: data after the JSON object")
	}
	return nil
}

func reply(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

func refuse(w http.ResponseWriter, code int, err error) {
	reply(w, code, Error{Error: err.Error()})
}
