package api

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/tether-sh/tether/pkg/panics"
)

// Server serves the API.
type Server struct {
	router
	srv *http.Server
}

// NewServer returns a server for svc; policy is called for every request.
func NewServer(svc Backend, policy func() *Policy, log *slog.Logger) *Server {
	s := &Server{router: router{svc: svc, policy: policy, log: log}}
	s.srv = socketServer(s.guard(s.mux(s.routes())), log)
	return s
}

// routes is the control socket's table: every verb, who may call it, and its handler.
func (s *Server) routes() []route {
	return []route{
		{pattern: "GET /v1/status", access: anyone, serve: s.status},
		{pattern: "GET /v1/agents", access: anyone, serve: s.list},
		// Who may register is in the body: admins bind cgroups, launch rules allow launches.
		{pattern: "POST /v1/agents", access: anyone, serve: withBody(s.register), status: http.StatusCreated},
		{pattern: "GET /v1/agents/{slot}", access: anyone, agent: true, serve: s.get},
		{pattern: "DELETE /v1/agents/{slot}", access: launcherOf, serve: s.unregister, status: http.StatusNoContent},
		{pattern: "PUT /v1/agents/{slot}/mode", access: admin, serve: withBody(s.setMode)},
		{pattern: "PUT /v1/agents/{slot}/killed", access: admin, serve: withBody(s.setKilled)},
		{pattern: "POST /v1/agents/{slot}/resume", access: admin, serve: s.resume},
		{pattern: "POST /v1/agents/{slot}/task", access: launcherOf, serve: withBody(s.startTask)},
		{pattern: "PUT /v1/agents/{slot}/task", access: launcherOf, serve: withBody(s.renewTask)},
		{pattern: "DELETE /v1/agents/{slot}/task", access: launcherOf, serve: s.endTask},
		{pattern: "POST /v1/agents/{slot}/task/approvals", access: admin, agent: true, serve: withBody(s.addApproval)},
		{pattern: "GET /v1/agents/{slot}/task/credential", access: launcherOf, serve: s.taskCredential},
		{pattern: "POST /v1/agents/{slot}/task/heartbeat", access: launcherOf, serve: withBody(s.heartbeat)},
		{pattern: "POST /v1/agents/{slot}/task/handoff", access: launcherOf, serve: withBody(s.handoff)},
		{pattern: "GET /v1/agents/{slot}/confinement", access: launcherOf, serve: s.confinement},
		{pattern: "POST /v1/agents/{slot}/refusals", access: launcherOf, serve: withBody(s.refusal), status: http.StatusNoContent},
		{pattern: "GET /v1/credentials/keys", access: anyone, serve: s.credentialKeys},
		{pattern: "GET /v1/credentials/revoked", access: anyone, serve: s.revokedCredentials},
		{pattern: "POST /v1/credentials/verify", access: anyone, serve: withBody(s.verifyCredential)},
		{pattern: "GET /v1/events", access: anyone, serve: s.events, status: streamed},
		{pattern: "POST /v1/kill", access: admin, serve: withBody(s.kill)},
		{pattern: "GET /v1/kills", access: anyone, serve: s.kills},
		{pattern: "POST /v1/readmit", access: admin, serve: withBody(s.readmit)},
		{pattern: "POST /v1/policy/reload", access: admin, serve: s.reloadPolicy},
		{pattern: "POST /v1/policy/eval", access: admin, serve: withBody(s.evalPolicy)},
		{pattern: "GET /v1/approvals", access: admin, serve: s.approvals},
		{pattern: "POST /v1/approvals/{id}/approve", access: admin, serve: withBody(s.approve)},
		{pattern: "POST /v1/approvals/{id}/deny", access: admin, serve: withBody(s.deny)},
	}
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

// BoundaryRequest counts the API requests whose handler panicked (see panics).
var BoundaryRequest = panics.Declare("api request")

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
