package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/confine"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/killpath"
	"github.com/tether-sh/tether/pkg/panics"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/pkg/stepup"
)

type fakeService struct {
	mu      sync.Mutex
	agents  map[dataplane.Slot]agents.Agent
	calls   []string
	stepups *stepup.Store
}

func newFakeService() *fakeService {
	launcher := uint32(1000)
	f := &fakeService{agents: map[dataplane.Slot]agents.Agent{
		1: {Slot: 1, SpiffeID: "spiffe://x/a", Launched: true, Launcher: &launcher, Sandbox: "default", UID: 2130706432},
		2: {Slot: 2, SpiffeID: "spiffe://x/b"},
		4: {Slot: 4, SpiffeID: "spiffe://x/team/raw", Launched: true, Launcher: &launcher, Sandbox: "off", UID: 7},
		5: {Slot: 5, SpiffeID: "spiffe://x/root/a", Launched: true, Launcher: new(uint32), Sandbox: "default", UID: 0},
	}, stepups: stepup.New(time.Hour, nil)}
	// A pending request of agent 1, and one already approved.
	f.stepups.Add(stepup.Request{Slot: 1, Action: "connect", Resource: "production", Deadline: time.Now().Add(time.Hour)})
	done, _ := f.stepups.Add(stepup.Request{Slot: 1, Action: "connect", Resource: "production", Deadline: time.Now().Add(time.Hour)})
	f.stepups.Decide(done.ID, func(r stepup.Request) (stepup.Request, error) { r.State = stepup.Approved; return r, nil })
	return f
}

// pending is the ID of the fake's pending request, approved the approved one's.
func (f *fakeService) pending() (pending, approved string) {
	for _, r := range f.stepups.List(nil) {
		if r.State == stepup.Pending {
			pending = r.ID
		} else {
			approved = r.ID
		}
	}
	return pending, approved
}

func (f fakeStepups) Request(_ context.Context, s dataplane.Slot, action, resource, reason string) (stepup.Request, error) {
	f.record("stepup " + action)
	if action != "connect" {
		return stepup.Request{}, fmt.Errorf("%w: the kernel enforces connect only", agents.ErrInvalid)
	}
	return f.stepups.Add(stepup.Request{Slot: s, Action: action, Resource: resource, Deadline: time.Now().Add(time.Hour)})
}
func (f fakeStepups) List(slot *dataplane.Slot) []stepup.Request { return f.stepups.List(slot) }
func (f fakeStepups) Approve(id, by string, uses int64, ttl time.Duration) (stepup.Request, error) {
	f.record("approve " + by)
	return f.stepups.Decide(id, func(r stepup.Request) (stepup.Request, error) {
		r.State, r.DecidedBy, r.Uses = stepup.Approved, by, uses
		return r, nil
	})
}
func (f fakeStepups) Deny(id, by, why string) (stepup.Request, error) {
	f.record("deny " + by)
	return f.stepups.Decide(id, func(r stepup.Request) (stepup.Request, error) {
		r.State, r.DecidedBy = stepup.Denied, by
		return r, nil
	})
}

// fakeStepups is the fake's step-up requests (their List is not the agents').
type fakeStepups struct{ *fakeService }

// backend serves every resource from f.
func (f *fakeService) backend() Backend {
	return Backend{Status: f.status, Agents: f, Credentials: f, Kills: f, Stepups: fakeStepups{f}, Policy: f, Events: f}
}

func (f *fakeService) record(c string) { f.mu.Lock(); f.calls = append(f.calls, c); f.mu.Unlock() }

func (f *fakeService) status() Status { return Status{Version: "test", Agents: len(f.agents)} }
func (f *fakeService) List() []agents.Agent {
	return []agents.Agent{f.agents[1], f.agents[2]}
}
func (f *fakeService) Get(s dataplane.Slot) (agents.Agent, bool) {
	a, ok := f.agents[s]
	return a, ok
}
func (f *fakeService) Register(r agents.Registration) (agents.Agent, error) {
	f.record("register " + r.SpiffeID)
	if r.SpiffeID == "spiffe://x/fail" {
		return agents.Agent{}, errors.New("compile error")
	}
	f.record(fmt.Sprintf("register %s uid=%d dynamic=%v share=%v", r.SpiffeID, r.UID, r.DynamicUID, r.ShareUID))
	if r.UID == 4242 && !r.ShareUID {
		return agents.Agent{}, fmt.Errorf("%w: uid 4242 is agent 1's", agents.ErrUIDTaken)
	}
	return agents.Agent{Slot: 3, SpiffeID: r.SpiffeID, Launcher: r.Launcher, UID: r.UID, DynamicUID: r.DynamicUID}, nil
}
func (f *fakeService) Confinement(s dataplane.Slot) (confine.Plan, error) {
	a, ok := f.agents[s]
	if !ok {
		return confine.Plan{}, fmt.Errorf("%w: slot %d", agents.ErrNotFound, s)
	}
	return confine.Plan{Profile: confine.Profile(a.Sandbox), Cgroup: "/cg/tether/a", UID: a.UID}, nil
}
func (f *fakeService) RecordRefusal(s dataplane.Slot, pid uint32, syscall, detail, errno string) error {
	f.record(fmt.Sprintf("refusal %d %s %s", s, syscall, errno))
	if _, ok := f.agents[s]; !ok {
		return fmt.Errorf("%w: slot %d", agents.ErrNotFound, s)
	}
	return nil
}
func (f *fakeService) Unregister(s dataplane.Slot) error { f.record("unregister"); return nil }
func (f *fakeService) SetMode(s dataplane.Slot, m *dataplane.Mode) (agents.Agent, error) {
	f.record("mode")
	if _, ok := f.agents[s]; !ok {
		return agents.Agent{}, agents.ErrNotFound
	}
	return f.agents[s], nil
}
func (f *fakeService) SetKilled(s dataplane.Slot, k bool) (agents.Agent, error) {
	f.record("killed")
	return f.agents[s], nil
}
func (f *fakeService) StartTask(s dataplane.Slot, t agents.TaskSpec) (agents.Agent, error) {
	f.record("task " + t.Type + " " + t.TTL.String())
	if t.Type == "busy" {
		return f.agents[s], fmt.Errorf("%w: already has one", agents.ErrTask)
	}
	return f.agents[s], nil
}
func (f *fakeService) RenewTask(s dataplane.Slot, ttl time.Duration) (agents.Agent, error) {
	f.record("renew " + ttl.String())
	return f.agents[s], nil
}
func (f *fakeService) EndTask(s dataplane.Slot) (agents.Agent, error) {
	f.record("end")
	return f.agents[s], nil
}
func (f *fakeService) AddApproval(s dataplane.Slot, action, resource, by string, ttl time.Duration, uses int64) (agents.Agent, error) {
	f.record("approve " + action + " " + resource + " " + by + " " + ttl.String())
	return f.agents[s], nil
}
func (f *fakeService) Reload(ctx context.Context, why string) (policy.EngineStatus, error) {
	f.record("reload")
	return policy.EngineStatus{Revision: "r2"}, nil
}
func (f *fakeService) TaskCredential(s dataplane.Slot) (credentials.Credential, error) {
	f.record("credential")
	return credentials.Credential{Slot: s, Token: "tok"}, nil
}
func (f *fakeService) Heartbeat(ctx context.Context, s dataplane.Slot, presented string, ttl time.Duration) (credentials.Credential, error) {
	f.record("heartbeat " + presented + " " + ttl.String())
	if presented == "old" {
		return credentials.Credential{}, fmt.Errorf("%w: superseded", credentials.ErrReplayed)
	}
	return credentials.Credential{Slot: s, Token: "next"}, nil
}
func (f *fakeService) Keys() jose.JSONWebKeySet { return jose.JSONWebKeySet{} }
func (f *fakeService) Revoked() []credentials.Revocation {
	return []credentials.Revocation{{ID: "r1"}}
}
func (f *fakeService) Verify(token string) (credentials.Claims, error) {
	return credentials.Claims{}, fmt.Errorf("%w at then", credentials.ErrExpired)
}
func (f *fakeService) Handoff(ctx context.Context, from, to dataplane.Slot, presented string, spec agents.HandoffSpec) (agents.Agent, credentials.Credential, error) {
	f.record(fmt.Sprintf("handoff %d %d", from, to))
	if presented == "old" {
		return agents.Agent{}, credentials.Credential{}, fmt.Errorf("the sender's credential: %w: superseded", credentials.ErrReplayed)
	}
	return agents.Agent{Slot: to}, credentials.Credential{Token: "handed"}, nil
}
func (f *fakeService) KillTarget(ctx context.Context, t killpath.Target, reason, requester string, terminate bool) ([]killpath.Kill, error) {
	f.record("kill " + requester)
	return []killpath.Kill{{ID: "k1", Reason: reason, Requester: requester}}, nil
}
func (f *fakeService) Resume(s dataplane.Slot) (agents.Agent, error) {
	f.record("resume")
	return agents.Agent{Slot: s}, nil
}
func (f *fakeService) Readmit(id string) ([]agents.Agent, error) {
	f.record("readmit " + id)
	return nil, nil
}
func (f *fakeService) Pending() []killpath.Kill     { return nil }
func (f *fakeService) DeniedIDs() []killpath.Denied { return nil }
func (f *fakeService) Subscribe(n int) *events.Subscription {
	return events.NewStream().Subscribe(n)
}
func (f *fakeService) Eval(ctx context.Context, query string, input []byte) (any, error) {
	f.record("eval " + query)
	if query == "bad" {
		return nil, errors.New("query \"bad\": want grants, allow, stepup or respond")
	}
	return map[string]any{"query": query}, nil
}

var testPolicy = &Policy{
	AdminUIDs: []uint32{500},
	AdminGIDs: []uint32{600},
	Launch: []LaunchRule{{IDs: []string{"spiffe://x/team/*"}, UIDs: []uint32{1000}, GIDs: []uint32{2000}},
		{IDs: []string{"spiffe://x/root/*"}, UIDs: []uint32{0}, Root: true, Unconfined: true}},
	Confined: func(pid int32) bool { return pid == 666 },
}

// call runs one request as caller c through the whole handler chain.
func call(t *testing.T, svc *fakeService, c Caller, method, path, body string) (int, string) {
	t.Helper()
	s := NewServer(svc.backend(), func() *Policy { return testPolicy }, slog.New(slog.DiscardHandler))
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	req = req.WithContext(context.WithValue(req.Context(), callerKey{}, c))
	rec := httptest.NewRecorder()
	s.srv.Handler.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}

// authCase is one request of TestAuthorization and its answer: status and a part of the body.
type authCase struct {
	name         string
	c            Caller
	method, path string
	body         string
	code         int
	want         string
}

// The callers of TestAuthorization.
var (
	asRoot          = Caller{PID: 1, UID: 0}
	asAdmin         = Caller{PID: 2, UID: 500}
	asAdminGroup    = Caller{PID: 2, UID: 501, GID: 7, Groups: []uint32{600}}
	asLauncher      = Caller{PID: 3, UID: 1000}
	asGroupLauncher = Caller{PID: 3, UID: 1001, Groups: []uint32{2000}}
	asNobody        = Caller{PID: 4, UID: 65534}
	asAgent         = Caller{PID: 666, UID: 0}
)

// authCases are the requests TestAuthorization makes, by callers of every kind.
var authCases = []authCase{
	{"status for anyone", asNobody, "GET", "/v1/status", "", 200, `"version":"test"`},
	{"nothing from inside an agent, even root", asAgent, "GET", "/v1/status", "", 403, "inside agents"},
	{"root registers a cgroup", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","cgroup":"/cg/tether/a"}`, 201, `"slot":3`},
	{"admin uid registers a cgroup", asAdmin, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","cgroup":"/cg/tether/a"}`, 201, ""},
	{"admin group registers a cgroup", asAdminGroup, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","cgroup":"/cg/tether/a"}`, 201, ""},
	{"launcher may not bind cgroups", asLauncher, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/team/a","cgroup":"/cg/tether/a"}`, 403, "not an admin"},
	{"launcher launches its identities", asLauncher, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/team/a","launch":true}`, 201, `"launcher_uid":1000`},
	{"group launcher too", asGroupLauncher, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/team/a","launch":true}`, 201, ""},
	{"but not others", asLauncher, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/admin","launch":true}`, 403, "may not launch spiffe://x/admin"},
	{"launcher labels", asLauncher, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/team/a","launch":true,"labels":{"team":"web"}}`, 201, ""},
	{"but not tether's own", asLauncher, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/team/a","launch":true,"labels":{"tether.dev/mode":"audit"}}`, 403, "labels under tether.dev/ are for admins"},
	{"admins may", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/team/a","launch":true,"labels":{"tether.dev/mode":"audit"}}`, 201, ""},
	{"nobody launches nothing", asNobody, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/team/a","launch":true}`, 403, "no launch rule"},
	{"launch and cgroup together", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","launch":true,"cgroup":"/x"}`, 400, "either"},
	{"neither", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a"}`, 400, "either"},
	{"missing id", asRoot, "POST", "/v1/agents", `{"launch":true}`, 400, "spiffe_id is required"},
	{"unknown field", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","launch":true,"admin":true}`, 400, "unknown field"},
	{"trailing data", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","launch":true} {}`, 400, "after the JSON"},
	{"not JSON", asRoot, "POST", "/v1/agents", `spiffe_id=x`, 400, "request body"},
	{"huge body", asRoot, "POST", "/v1/agents", `{"spiffe_id":"` + strings.Repeat("a", maxBody) + `"}`, 400, "over"},
	{"service error is reported", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/fail","launch":true}`, 400, "compile error"},
	{"launcher ends its agent", asLauncher, "DELETE", "/v1/agents/1", "", 204, ""},
	{"but not another", asLauncher, "DELETE", "/v1/agents/2", "", 403, "not an admin"},
	{"admin ends any", asAdmin, "DELETE", "/v1/agents/2", "", 204, ""},
	{"unknown slot", asRoot, "DELETE", "/v1/agents/9", "", 404, "no agent in slot 9"},
	{"bad slot", asRoot, "DELETE", "/v1/agents/x", "", 400, "want a number"},
	{"slot out of range", asRoot, "GET", "/v1/agents/99999", "", 400, "below 16384"},
	{"mode by admin", asAdmin, "PUT", "/v1/agents/1/mode", `{"mode":"audit"}`, 200, ""},
	{"mode cleared", asAdmin, "PUT", "/v1/agents/1/mode", `{"mode":null}`, 200, ""},
	{"mode by launcher refused", asLauncher, "PUT", "/v1/agents/1/mode", `{"mode":"audit"}`, 403, ""},
	{"bad mode", asAdmin, "PUT", "/v1/agents/1/mode", `{"mode":"off"}`, 400, "unknown mode"},
	{"mode of unknown agent", asAdmin, "PUT", "/v1/agents/7/mode", `{"mode":"audit"}`, 404, "no such agent"},
	{"killed needs a value", asAdmin, "PUT", "/v1/agents/1/killed", `{}`, 400, "required"},
	{"killed by admin", asAdmin, "PUT", "/v1/agents/1/killed", `{"killed":true}`, 200, ""},
	{"killed by nobody", asNobody, "PUT", "/v1/agents/1/killed", `{"killed":true}`, 403, ""},
	{"launcher starts a task", asLauncher, "POST", "/v1/agents/1/task", `{"type":"coding","ttl":"1h"}`, 200, ""},
	{"but not on another agent", asLauncher, "POST", "/v1/agents/2/task", `{"type":"coding","ttl":"1h"}`, 403, ""},
	{"task ttl syntax", asRoot, "POST", "/v1/agents/1/task", `{"type":"coding","ttl":"soon"}`, 400, "ttl"},
	{"second task", asRoot, "POST", "/v1/agents/1/task", `{"type":"busy","ttl":"1h"}`, 409, "already"},
	{"renew", asLauncher, "PUT", "/v1/agents/1/task", `{"ttl":"30m"}`, 200, ""},
	{"end", asAdmin, "DELETE", "/v1/agents/2/task", "", 200, ""},
	{"approval by admin", asAdmin, "POST", "/v1/agents/1/task/approvals", `{"action":"connect","resource":"production","ttl":"15m"}`, 200, ""},
	{"approval by the launcher refused", asLauncher, "POST", "/v1/agents/1/task/approvals", `{"action":"connect","resource":"production","ttl":"15m"}`, 403, "not an admin"},
	{"policy reload by admin", asAdmin, "POST", "/v1/policy/reload", "", 200, `"revision":"r2"`},
	{"policy reload by nobody", asNobody, "POST", "/v1/policy/reload", "", 403, ""},
	{"policy eval", asRoot, "POST", "/v1/policy/eval", `{"query":"grants","input":{"agent":{}}}`, 200, `"query":"grants"`},
	{"policy eval error", asRoot, "POST", "/v1/policy/eval", `{"query":"bad","input":{}}`, 422, "want grants"},
	{"launcher reads its agent's credential", asLauncher, "GET", "/v1/agents/1/task/credential", "", 200, `"token":"tok"`},
	{"nobody else does", asNobody, "GET", "/v1/agents/1/task/credential", "", 403, "not an admin"},
	{"heartbeat", asLauncher, "POST", "/v1/agents/1/task/heartbeat", `{"credential":"cur","ttl":"1m"}`, 200, `"token":"next"`},
	{"heartbeat replayed", asLauncher, "POST", "/v1/agents/1/task/heartbeat", `{"credential":"old","ttl":"1m"}`, 409, "credential replayed"},
	{"heartbeat without a credential", asLauncher, "POST", "/v1/agents/1/task/heartbeat", `{"ttl":"1m"}`, 400, "presents the task's current credential"},
	{"heartbeat of another's agent", asLauncher, "POST", "/v1/agents/2/task/heartbeat", `{"credential":"cur","ttl":"1m"}`, 403, ""},
	{"revocation list for anyone", asNobody, "GET", "/v1/credentials/revoked", "", 200, `"id":"r1"`},
	{"key set for anyone", asNobody, "GET", "/v1/credentials/keys", "", 200, `"keys"`},
	{"verify says why", asNobody, "POST", "/v1/credentials/verify", `{"token":"x"}`, 403, "credential expired"},
	{"launch as root needs --allow-root", asLauncher, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/team/a","launch":true,"uid":0}`, 403, "needs --allow-root"},
	{"launch as another uid refused", asLauncher, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/team/a","launch":true,"uid":5}`, 403, "may not launch an agent running as uid 5"},
	{"a launch gets a uid of its own", asLauncher, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/team/a","launch":true}`, 201, `"dynamic_uid":true`},
	{"even root's", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","launch":true}`, 201, `"dynamic_uid":true`},
	{"root agents need a rule, admins too", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","launch":true,"allow_root":true}`, 403, "launch rule with root: true"},
	{"and --allow-root", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/root/a","launch":true,"uid":0}`, 403, "needs --allow-root"},
	{"root agent with both", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/root/a","launch":true,"allow_root":true}`, 201, `"uid":0`},
	{"a rule for root is not for others", asLauncher, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/root/a","launch":true,"allow_root":true}`, 403, ""},
	{"another live agent's uid", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","launch":true,"uid":4242}`, 409, "uid taken"},
	{"shared on purpose", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","launch":true,"uid":4242,"share_uid":true}`, 201, ""},
	{"launcher reads its agent's confinement", asLauncher, "GET", "/v1/agents/1/confinement", "", 200, `"cgroup":"/cg/tether/a"`},
	{"nobody else does", asNobody, "GET", "/v1/agents/1/confinement", "", 403, "not an admin"},
	{"sandbox off needs an unconfined rule", asLauncher, "GET", "/v1/agents/4/confinement", "", 403, "sandbox: off"},
	{"admins too", asRoot, "GET", "/v1/agents/4/confinement", "", 403, "unconfined: true"},
	{"keep_caps is for root agents", asLauncher, "GET", "/v1/agents/1/confinement?keep_caps=true", "", 400, "--allow-root"},
	{"keep_caps with a rule", asRoot, "GET", "/v1/agents/5/confinement?keep_caps=true", "", 200, `"keep_caps":true`},
	{"confinement of nothing", asRoot, "GET", "/v1/agents/9/confinement", "", 404, ""},
	{"launcher reports a refused call", asLauncher, "POST", "/v1/agents/1/refusals", `{"pid":7,"syscall":"bpf","errno":"EPERM"}`, 204, ""},
	{"nobody else does", asNobody, "POST", "/v1/agents/1/refusals", `{"pid":7,"syscall":"bpf","errno":"EPERM"}`, 403, "not an admin"},
	{"a refusal names its call", asLauncher, "POST", "/v1/agents/1/refusals", `{"pid":7,"errno":"EPERM"}`, 400, "names the refused"},
	{"a name is a name", asLauncher, "POST", "/v1/agents/1/refusals", `{"pid":7,"syscall":"bpf\n<x>","errno":"EPERM"}`, 400, "not a system call"},
	{"root launches as another uid", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/team/a","launch":true,"uid":1000}`, 201, ""},
	{"launcher hands over between its agents", asLauncher, "POST", "/v1/agents/1/task/handoff", `{"to":1,"credential":"cur","ttl":"10m"}`, 200, `"token":"handed"`},
	{"but not to another's agent", asLauncher, "POST", "/v1/agents/1/task/handoff", `{"to":2,"credential":"cur","ttl":"10m"}`, 403, "neither launched agent 2"},
	{"handoff with a replayed credential", asLauncher, "POST", "/v1/agents/1/task/handoff", `{"to":1,"credential":"old","ttl":"10m"}`, 409, "credential replayed"},
	{"handoff to nobody", asRoot, "POST", "/v1/agents/1/task/handoff", `{"to":9,"credential":"cur","ttl":"10m"}`, 404, "receiver"},
	{"kill by admin", asAdmin, "POST", "/v1/kill", `{"spiffe_id":"spiffe://x/a","reason":"exfiltration"}`, 200, `"requester":"uid:500"`},
	{"kill needs a reason", asAdmin, "POST", "/v1/kill", `{"spiffe_id":"spiffe://x/a"}`, 400, "reason is required"},
	{"kill by a launcher refused", asLauncher, "POST", "/v1/kill", `{"slot":1,"reason":"x"}`, 403, "not an admin"},
	{"resume by admin", asAdmin, "POST", "/v1/agents/1/resume", "", 200, ""},
	{"readmit by nobody refused", asNobody, "POST", "/v1/readmit", `{"spiffe_id":"spiffe://x/a"}`, 403, ""},
	{"register with a task", asRoot, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","launch":true,"task":{"type":"coding","ttl":"x"}}`, 400, "task ttl"},
}

func TestAuthorization(t *testing.T) {
	for _, tt := range authCases {
		t.Run(tt.name, func(t *testing.T) {
			code, body := call(t, newFakeService(), tt.c, tt.method, tt.path, tt.body)
			if code != tt.code || !strings.Contains(body, tt.want) {
				t.Errorf("%s %s as uid %d: %d %s, want %d with %q", tt.method, tt.path, tt.c.UID, code, body, tt.code, tt.want)
			}
		})
	}
}

func TestRefusedRequestsChangeNothing(t *testing.T) {
	svc := newFakeService()
	nobody := Caller{PID: 4, UID: 65534}
	call(t, svc, nobody, "PUT", "/v1/agents/1/killed", `{"killed":true}`)
	call(t, svc, nobody, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","cgroup":"/x"}`)
	call(t, svc, Caller{UID: 0}, "POST", "/v1/agents", `{"spiffe_id":"spiffe://x/a","cgroup":"/x","extra":1}`)
	if len(svc.calls) != 0 {
		t.Errorf("refused requests reached the service: %v", svc.calls)
	}
}

// TestSocket serves on a real unix socket and checks that the caller is who the kernel says.
func TestSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "tapi")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "s.sock")
	l, err := Listen(path, "")
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v", fi.Mode().Perm())
	}
	var seen Caller
	pol := &Policy{Confined: func(pid int32) bool { return false }}
	s := NewServer(newFakeService().backend(), func() *Policy { return pol }, slog.New(slog.DiscardHandler))
	inner := s.srv.Handler
	s.srv.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen, _ = r.Context().Value(callerKey{}).(Caller)
		inner.ServeHTTP(w, r)
	})
	go s.Serve(l)
	defer s.Shutdown(context.Background())

	st, err := NewClient(path).Status()
	if err != nil {
		t.Fatal(err)
	}
	if st.Version != "test" || seen.PID != int32(os.Getpid()) || seen.UID != uint32(os.Getuid()) {
		t.Errorf("status %+v, caller %+v", st, seen)
	}
	if _, err := Listen(path, ""); err == nil || !strings.Contains(err.Error(), "another tetherd") {
		t.Errorf("second listener: %v", err)
	}
	_, err = NewClient(path).SetMode(7, nil)
	if err == nil || !strings.Contains(err.Error(), "tetherd: ") || CodeOf(err) != CodeNotFound {
		t.Errorf("error from the server: %v (code %q)", err, CodeOf(err))
	}
	// No tetherd there: where it was looked for and how to point elsewhere, no code.
	_, err = NewClient(filepath.Join(dir, "none.sock")).Status()
	if err == nil || !strings.Contains(err.Error(), "cannot reach tetherd at "+filepath.Join(dir, "none.sock")) ||
		!strings.Contains(err.Error(), "TETHER_SOCKET") || CodeOf(err) != "" {
		t.Errorf("no tetherd: %v", err)
	}
}

// TestErrorCodes: a refused request carries a code a client acts on, from the error's kind or
// else its HTTP status.
func TestErrorCodes(t *testing.T) {
	for _, c := range []struct {
		err    error
		status int
		want   string
	}{
		{fmt.Errorf("heartbeat: %w", credentials.ErrReplayed), http.StatusConflict, CodeCredentialReplayed},
		{fmt.Errorf("%w: agent 3 has no task", agents.ErrTask), http.StatusConflict, CodeNoTask},
		{credentials.ErrExpired, http.StatusForbidden, CodeCredentialExpired},
		{stepup.ErrDecided, http.StatusConflict, CodeStepupDecided},
		{errors.New("no such agent"), http.StatusNotFound, CodeNotFound},
		{errors.New("the caller's credentials could not be read"), http.StatusForbidden, CodeForbidden},
		{errors.New("ttl: bad"), http.StatusBadRequest, CodeBadRequest},
		{errors.New("boom"), http.StatusInternalServerError, CodeInternal},
	} {
		rec := httptest.NewRecorder()
		refuse(rec, c.status, c.err)
		var body Error
		if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Code != c.want || body.Error != c.err.Error() {
			t.Errorf("%v: %s, want code %s", c.err, rec.Body.String(), c.want)
		}
	}
}

// FuzzDecodeRegister: the request decoder refuses or accepts, never panics, and what it accepts
// round-trips.
func FuzzDecodeRegister(f *testing.F) {
	f.Add([]byte(`{"spiffe_id":"spiffe://x/a","launch":true}`))
	f.Add([]byte(`{"spiffe_id":1}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var r RegisterRequest
		if DecodeJSON(b, &r) != nil {
			return
		}
		var m ModeRequest
		DecodeJSON(b, &m)
	})
}

// TestApprovals: only admins list, approve and deny step-up requests, on the admin socket; a
// request is approved once; unknown IDs, replays, bad bodies and callers inside agents are
// refused with why, and change nothing.
func TestApprovals(t *testing.T) {
	svc := newFakeService()
	pending, approved := svc.pending()
	admin := Caller{PID: 2, UID: 500}
	for _, tt := range []authCase{
		{"list by a non-admin", Caller{PID: 4, UID: 1000}, "GET", "/v1/approvals", "", 403, "not an admin"},
		{"approve by a non-admin", Caller{PID: 4, UID: 1000}, "POST", "/v1/approvals/" + pending + "/approve", `{"uses":1}`, 403, "not an admin"},
		{"approve from inside an agent, even as root", Caller{PID: 666, UID: 0}, "POST", "/v1/approvals/" + pending + "/approve", `{}`, 403, "inside agents"},
		{"approve an unknown request", admin, "POST", "/v1/approvals/req-nope/approve", `{}`, 404, "no such step-up request"},
		{"approve a used approval again", admin, "POST", "/v1/approvals/" + approved + "/approve", `{}`, 409, "already decided"},
		{"approve with a bad ttl", admin, "POST", "/v1/approvals/" + pending + "/approve", `{"ttl":"forever"}`, 400, "ttl"},
		{"approve with an unknown field", admin, "POST", "/v1/approvals/" + pending + "/approve", `{"uses":1,"for":"me"}`, 400, "unknown field"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, body := call(t, svc, tt.c, tt.method, tt.path, tt.body)
			if code != tt.code || !strings.Contains(body, tt.want) {
				t.Errorf("%d %s, want %d with %q", code, body, tt.code, tt.want)
			}
		})
	}
	if len(svc.calls) != 2 { // the unknown and the replayed one reach the service, which refuses them
		t.Errorf("refused requests reached the service: %v", svc.calls)
	}
	if r, _ := svc.stepups.Get(pending); r.State != stepup.Pending {
		t.Fatalf("a refused approval changed the request: %+v", r)
	}
	code, body := call(t, svc, admin, "POST", "/v1/approvals/"+pending+"/approve", `{"uses":2,"ttl":"5m"}`)
	if code != 200 || !strings.Contains(body, `"state":"approved"`) || !strings.Contains(body, `"decided_by":"uid:500"`) {
		t.Errorf("approve: %d %s", code, body)
	}
	if code, body := call(t, svc, admin, "POST", "/v1/approvals/"+pending+"/deny", `{}`); code != 409 {
		t.Errorf("deny after approve: %d %s", code, body)
	}
}

// FuzzDecodeStepup: the agent socket's request decoder refuses or accepts, never panics.
func FuzzDecodeStepup(f *testing.F) {
	f.Add([]byte(`{"action":"connect","resource":"production","reason":"incident 42"}`))
	f.Add([]byte(`{"action":"connect","resource":1}`))
	f.Add([]byte(`{"uses":-1,"ttl":"1h"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var r StepupRequest
		if DecodeJSON(b, &r) == nil && len(b) > maxBody {
			t.Fatalf("accepted %d bytes", len(b))
		}
		var a ApproveRequest
		DecodeJSON(b, &a)
		var d DenyRequest
		DecodeJSON(b, &d)
	})
}

// callAgent runs one request on the agent socket's handlers as caller c; agentOf finds pid 666
// in agent 2 and nobody else in any agent.
func callAgent(t *testing.T, svc *fakeService, c Caller, method, path, body string) (int, string) {
	t.Helper()
	s := NewAgentServer(svc.backend(), func(pid int32) (dataplane.Slot, bool) { return 2, pid == 666 }, slog.New(slog.DiscardHandler))
	req := httptest.NewRequest(method, path, strings.NewReader(body))
	req = req.WithContext(context.WithValue(req.Context(), callerKey{}, c))
	rec := httptest.NewRecorder()
	s.srv.Handler.ServeHTTP(rec, req)
	return rec.Code, rec.Body.String()
}

// TestAgentSocket: an agent is who its cgroup says, acts only on itself and sees only its own
// requests; a process outside agents is refused, even as root; there is no verb to approve.
func TestAgentSocket(t *testing.T) {
	svc := newFakeService() // its requests are agent 1's
	inAgent2 := Caller{PID: 666, UID: 1000}
	if code, body := callAgent(t, svc, inAgent2, "GET", "/v1/self/stepup", ""); code != 200 || strings.TrimSpace(body) != "null" {
		t.Errorf("agent 2 lists agent 1's requests: %d %s", code, body)
	}
	code, body := callAgent(t, svc, inAgent2, "POST", "/v1/self/stepup", `{"action":"connect","resource":"production","reason":"x"}`)
	if code != 200 || !strings.Contains(body, `"agent_slot":2`) || !strings.Contains(body, `"state":"pending"`) {
		t.Errorf("request: %d %s", code, body)
	}
	if code, body := callAgent(t, svc, inAgent2, "POST", "/v1/self/stepup", `{"action":"connect","resource":"production","slot":1}`); code != 400 || !strings.Contains(body, "unknown field") {
		t.Errorf("naming another agent: %d %s", code, body)
	}
	pending, _ := svc.pending()
	if code, _ := callAgent(t, svc, inAgent2, "POST", "/v1/approvals/"+pending+"/approve", `{}`); code != 404 && code != 405 {
		t.Errorf("approving on the agent socket: %d", code)
	}
	if code, body := callAgent(t, svc, Caller{PID: 1, UID: 0}, "GET", "/v1/self", ""); code != 403 || !strings.Contains(body, "only processes inside an agent") {
		t.Errorf("root outside agents: %d %s", code, body)
	}
	if code, body := callAgent(t, svc, inAgent2, "POST", "/v1/self/stepup", `{"action":"read-secret","resource":"db"}`); code != 400 || !strings.Contains(body, "connect only") {
		t.Errorf("a step-up the kernel cannot enforce: %d %s", code, body)
	}
	// Renewing its own task takes the current credential, as a heartbeat does.
	for _, tc := range []struct {
		body string
		code int
		want string
	}{
		{`{"ttl":"1m"}`, 400, "presents the task's current credential"},
		{`{"ttl":"soon","credential":"cur"}`, 400, "ttl"},
		{`{"ttl":"1m","credential":"old"}`, 409, "replayed"},
		{`{"ttl":"1m","credential":"cur"}`, 200, `"token":"next"`},
	} {
		if code, body := callAgent(t, svc, inAgent2, "PUT", "/v1/self/task", tc.body); code != tc.code || !strings.Contains(body, tc.want) {
			t.Errorf("self renewal %s: %d %s, want %d %q", tc.body, code, body, tc.code, tc.want)
		}
	}
}

// FuzzAPIRequest: any request on the control API (any method, path, body and caller) is answered
// or refused with why, and no handler panics (a panic would be answered 500 and counted: here it
// fails the test).
func FuzzAPIRequest(f *testing.F) {
	f.Add(uint8(1), "/v1/agents", []byte(`{"spiffe_id":"spiffe://x/a","launch":true}`), uint32(0))
	f.Add(uint8(1), "/v1/agents/1/task", []byte(`{"type":"coding","ttl":"1h"}`), uint32(500))
	f.Add(uint8(1), "/v1/approvals/x/approve", []byte(`{"uses":1}`), uint32(1000))
	f.Add(uint8(0), "/v1/agents/18446744073709551616", []byte{}, uint32(0))
	f.Add(uint8(3), "/v1/agents/1", []byte(`null`), uint32(0))
	f.Add(uint8(1), "/v1/kill", []byte(`{"slot":1,"reason":"x","terminate":true}`), uint32(0))
	f.Add(uint8(0x81), "/v1/self/stepup", []byte(`{"action":"connect","resource":"production","reason":"x"}`), uint32(1000))
	f.Add(uint8(0x82), "/v1/self/task", []byte(`{"ttl":"1h"}`), uint32(1000))
	f.Fuzz(func(t *testing.T, m uint8, path string, body []byte, uid uint32) {
		methods := []string{"GET", "POST", "PUT", "DELETE", "PATCH"}
		req, err := http.NewRequest(methods[int(m)%len(methods)], "http://tether/"+strings.TrimPrefix(path, "/"), bytes.NewReader(body))
		if err != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second) // a stream ends
		defer cancel()
		req = req.WithContext(context.WithValue(ctx, callerKey{}, Caller{PID: 2, UID: uid}))
		before := panics.Counts()[BoundaryRequest]
		var h http.Handler
		if m&0x80 != 0 { // the agents' socket
			h = NewAgentServer(newFakeService().backend(), func(int32) (dataplane.Slot, bool) { return 1, uid != 0 }, slog.New(slog.DiscardHandler)).srv.Handler
		} else {
			h = NewServer(newFakeService().backend(), func() *Policy { return testPolicy }, slog.New(slog.DiscardHandler)).srv.Handler
		}
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if panics.Counts()[BoundaryRequest] != before {
			t.Fatalf("%s %s (%q) panicked: %s", req.Method, req.URL.Path, body, rec.Body.String())
		}
	})
}

// TestRecoveringRefusesAPanic: a handler that panics is answered 500 with the reason, counted, and
// the server goes on; a deliberate abort (http.ErrAbortHandler) is left to net/http.
func TestRecoveringRefusesAPanic(t *testing.T) {
	before := panics.Counts()[BoundaryRequest]
	h := recovering(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
		var m map[string]int
		m["x"]++
	}), slog.New(slog.DiscardHandler))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/v1/agents", nil))
	if rec.Code != 500 || !strings.Contains(rec.Body.String(), "nil map") {
		t.Errorf("a panicking handler: %d %s", rec.Code, rec.Body.String())
	}
	if panics.Counts()[BoundaryRequest] != before+1 {
		t.Errorf("the panic was not counted")
	}
	abort := recovering(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { panic(http.ErrAbortHandler) }), slog.New(slog.DiscardHandler))
	defer func() {
		if v := recover(); v != http.ErrAbortHandler {
			t.Errorf("an abort came back as %v", v)
		}
	}()
	abort.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/", nil))
}

// TestEveryRouteChecksItsAccess: the route table is the authorization. Every admin route refuses
// a launcher and nobody; every launcher route refuses nobody and lets the agent's launcher
// through; every route refuses a process inside an agent; and a refused call reaches no service
// method.
func TestEveryRouteChecksItsAccess(t *testing.T) {
	launcher := Caller{PID: 3, UID: 1000} // launched agents 1 and 4
	nobody := Caller{PID: 4, UID: 65534}
	agent := Caller{PID: 666, UID: 0}
	f := newFakeService()
	pending, _ := f.pending()
	routes := NewServer(f.backend(), func() *Policy { return testPolicy }, slog.New(slog.DiscardHandler)).routes()
	for _, x := range routes {
		method, path, _ := strings.Cut(x.pattern, " ")
		path = strings.NewReplacer("{slot}", "1", "{id}", pending).Replace(path)
		if x.status == streamed {
			continue // the event stream: anyone's, and it does not end
		}
		for _, tc := range []struct {
			who     string
			c       Caller
			refused bool
		}{
			{"nobody", nobody, x.access == admin || x.access == launcherOf},
			{"the launcher", launcher, x.access == admin},
			{"an agent", agent, true},
		} {
			f := newFakeService()
			code, body := call(t, f, tc.c, method, path, "{}")
			refused := code == http.StatusForbidden && (strings.Contains(body, "is not an admin") || strings.Contains(body, "may not use the control API"))
			if refused != tc.refused {
				t.Errorf("%s by %s: %d %s (refused: want %v)", x.pattern, tc.who, code, body, tc.refused)
			}
			if tc.refused && len(f.calls) != 0 {
				t.Errorf("%s by %s reached the service: %v", x.pattern, tc.who, f.calls)
			}
		}
	}
}
