package api

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/stepup"
)

// access is who may call a route. The router checks it once, before the handler runs, always in
// the same order: the slot the path names (400), the agent in it where the route needs one
// (404), the caller's access (403); the handler then decodes the body (400) and checks what
// depends on it (launch rules, the receiver of a handoff).
type access int

const (
	// anyone outside the agents (the socket's guard refuses processes inside them).
	anyone access = iota
	// launcherOf: an admin, or the uid that launched the agent the path names.
	launcherOf
	// admin: root, api.admin_uids, api.admin_gids.
	admin
	// self: a process inside an agent, on the agent socket, about its own agent.
	self
)

// route is one verb of a socket: its pattern (net/http's), who may call it, and what it does.
type route struct {
	pattern string
	access  access
	// agent: the slot in the path must name an agent (launcherOf implies it).
	agent bool
	serve func(c *request) (any, error)
	// status of a success: 0 is 200 with the value serve returns; 204 sends no body; streamed
	// leaves the response to serve.
	status int
}

// streamed is the status of a route whose handler writes its own response.
const streamed = -1

// request is one call as the handlers see it, once the router has admitted it.
type request struct {
	w      http.ResponseWriter
	r      *http.Request
	caller Caller
	// slot is the path's, or on the agent socket the caller's agent.
	slot dataplane.Slot
	// agent is the agent in slot, for routes that need one.
	agent agents.Agent
}

// by names the caller in records: "uid:N".
func (c *request) by() string { return fmt.Sprintf("uid:%d", c.caller.UID) }

// router serves a socket's routes.
type router struct {
	svc Backend
	log *slog.Logger
	// policy is read per request (a reload swaps it); nil on the agent socket.
	policy func() *Policy
}

// mux returns the handler of routes.
func (rt *router) mux(routes []route) *http.ServeMux {
	mux := http.NewServeMux()
	for _, x := range routes {
		mux.HandleFunc(x.pattern, rt.handle(x))
	}
	return mux
}

// handle admits a request to x, runs it, and answers with its value or its error.
func (rt *router) handle(x route) http.HandlerFunc {
	slotted := strings.Contains(x.pattern, "{slot}")
	return func(w http.ResponseWriter, r *http.Request) {
		c := &request{w: w, r: r, caller: caller(r)}
		v, err := any(nil), rt.admit(x, slotted, c)
		if err == nil {
			v, err = x.serve(c)
		}
		switch {
		case err != nil:
			refuse(w, statusOf(err), err)
		case x.status == streamed:
		case x.status == http.StatusNoContent:
			w.WriteHeader(http.StatusNoContent)
		default:
			reply(w, cmp.Or(x.status, http.StatusOK), v)
		}
	}
}

// admit reads the path's slot (slotted: the pattern has one) and agent and checks the caller's
// access.
func (rt *router) admit(x route, slotted bool, c *request) error {
	if x.access == self {
		c.slot = selfSlot(c.r)
		return nil
	}
	if slotted {
		slot, err := pathSlot(c.r)
		if err != nil {
			return err
		}
		c.slot = slot
		if x.agent || x.access == launcherOf {
			a, found := rt.svc.Agents.Get(slot)
			if !found {
				return withStatus(http.StatusNotFound, fmt.Errorf("no agent in slot %d", slot))
			}
			c.agent = a
		}
	}
	switch x.access {
	case admin:
		return rt.admin(c)
	case launcherOf:
		if launched(c.agent, c.caller) {
			return nil
		}
		return rt.admin(c)
	}
	return nil
}

// admin refuses a caller who is not an admin.
func (rt *router) admin(c *request) error {
	if !rt.policy().IsAdmin(c.caller) {
		return forbidden(fmt.Errorf("uid %d is not an admin (api.admin_uids, api.admin_gids)", c.caller.UID))
	}
	return nil
}

// launched says whether c launched a.
func launched(a agents.Agent, c Caller) bool { return a.Launcher != nil && *a.Launcher == c.UID }

func pathSlot(r *http.Request) (dataplane.Slot, error) {
	n, err := strconv.ParseUint(r.PathValue("slot"), 10, 32)
	if err != nil || n >= dataplane.MaxAgents {
		return 0, badRequest(fmt.Errorf("agent slot %q: want a number below %d", r.PathValue("slot"), dataplane.MaxAgents))
	}
	return dataplane.Slot(n), nil
}

// withBody decodes the request's body into a T (strictly: see DecodeJSON) for serve.
func withBody[T any](serve func(c *request, req T) (any, error)) func(*request) (any, error) {
	return func(c *request) (any, error) {
		var req T
		if err := decode(c.r, &req); err != nil {
			return nil, badRequest(err)
		}
		return serve(c, req)
	}
}

// statusError is an error with the HTTP status it is answered with.
type statusError struct {
	status int
	err    error
}

func (e *statusError) Error() string { return e.err.Error() }
func (e *statusError) Unwrap() error { return e.err }

func withStatus(status int, err error) error { return &statusError{status, err} }
func badRequest(err error) error             { return withStatus(http.StatusBadRequest, err) }
func forbidden(err error) error              { return withStatus(http.StatusForbidden, err) }

// statusOf is the HTTP status of a refused request: the one a handler gave it, else the one of
// the domain's error it wraps. It is the only place that maps the domain's errors to HTTP.
func statusOf(err error) int {
	var se *statusError
	switch {
	case errors.As(err, &se):
		return se.status
	case errors.Is(err, agents.ErrNotFound), errors.Is(err, stepup.ErrNotFound):
		return http.StatusNotFound
	case errors.Is(err, agents.ErrInvalid):
		return http.StatusBadRequest
	case errors.Is(err, credentials.ErrReplayed), errors.Is(err, agents.ErrTask), errors.Is(err, agents.ErrUIDTaken),
		errors.Is(err, stepup.ErrDecided):
		return http.StatusConflict
	case errors.Is(err, credentials.ErrExpired), errors.Is(err, credentials.ErrRevoked), errors.Is(err, credentials.ErrInvalid),
		errors.Is(err, stepup.ErrRefused):
		return http.StatusForbidden
	}
	return http.StatusInternalServerError
}

// ttlOf parses a request's ttl.
func ttlOf(s string) (time.Duration, error) {
	ttl, err := time.ParseDuration(s)
	if err != nil {
		return 0, badRequest(fmt.Errorf("ttl %q: %w", s, err))
	}
	return ttl, nil
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
	reply(w, code, Error{Error: err.Error(), Code: codeOf(err, code)})
}

// codeOf is the Error code of err, refused with HTTP status.
func codeOf(err error, status int) string {
	for _, c := range []struct {
		err  error
		code string
	}{
		{credentials.ErrReplayed, CodeCredentialReplayed}, {credentials.ErrExpired, CodeCredentialExpired},
		{credentials.ErrRevoked, CodeCredentialRevoked}, {credentials.ErrInvalid, CodeCredentialInvalid},
		{agents.ErrTask, CodeNoTask}, {agents.ErrUIDTaken, CodeUIDTaken}, {agents.ErrInvalid, CodeInvalid},
		{stepup.ErrDecided, CodeStepupDecided}, {stepup.ErrRefused, CodeStepupRefused},
	} {
		if errors.Is(err, c.err) {
			return c.code
		}
	}
	switch {
	case status == http.StatusNotFound:
		return CodeNotFound
	case status == http.StatusForbidden:
		return CodeForbidden
	case status == http.StatusConflict:
		return CodeConflict
	case status >= 500:
		return CodeInternal
	}
	return CodeBadRequest
}
