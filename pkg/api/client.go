package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"time"

	"github.com/tether-sh/tether/pkg/agents"
	"github.com/tether-sh/tether/pkg/confine"
	"github.com/tether-sh/tether/pkg/credentials"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/events"
	"github.com/tether-sh/tether/pkg/killpath"
	"github.com/tether-sh/tether/pkg/policy"
	"github.com/tether-sh/tether/pkg/stepup"
)

// RemoteError is a request tetherd refused: the HTTP status, the code (Code*) and why.
type RemoteError struct {
	Status  int
	Code    string
	Message string
}

func (e *RemoteError) Error() string { return "tetherd: " + e.Message }

// CodeOf is the code of a request tetherd refused, "" for any other error.
func CodeOf(err error) string {
	var re *RemoteError
	if errors.As(err, &re) {
		return re.Code
	}
	return ""
}

func remoteError(resp *http.Response, body []byte) error {
	e := &RemoteError{Status: resp.StatusCode, Message: resp.Status}
	var b Error
	if json.Unmarshal(body, &b) == nil && b.Error != "" {
		e.Message, e.Code = b.Error, b.Code
	}
	return e
}

// unreachable says that tetherd did not answer at all, and where it was looked for.
func (c *Client) unreachable(err error) error {
	return fmt.Errorf("cannot reach tetherd at %s (is it running? the socket is --socket or $TETHER_SOCKET): %w", c.socket, err)
}

// Client calls a tetherd over its unix socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a client for the socket at path.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}
	return &Client{socket: path, http: &http.Client{Transport: tr, Timeout: 30 * time.Second}}
}

func (c *Client) do(method, path string, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, "http://tetherd"+path, rd)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return c.unreachable(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return fmt.Errorf("reading tetherd's answer: %w", err)
	}
	if resp.StatusCode >= 300 {
		return remoteError(resp, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("decoding tetherd's answer: %w", err)
		}
	}
	return nil
}

func (c *Client) Status() (Status, error) {
	var s Status
	return s, c.do(http.MethodGet, "/v1/status", nil, &s)
}

func (c *Client) Agents() ([]agents.Agent, error) {
	var a []agents.Agent
	return a, c.do(http.MethodGet, "/v1/agents", nil, &a)
}

func (c *Client) Agent(slot dataplane.Slot) (agents.Agent, error) {
	var a agents.Agent
	return a, c.do(http.MethodGet, fmt.Sprintf("/v1/agents/%d", slot), nil, &a)
}

func (c *Client) Register(req RegisterRequest) (agents.Agent, error) {
	var a agents.Agent
	return a, c.do(http.MethodPost, "/v1/agents", req, &a)
}

func (c *Client) Unregister(slot dataplane.Slot) error {
	return c.do(http.MethodDelete, fmt.Sprintf("/v1/agents/%d", slot), nil, nil)
}

// SetMode sets the agent's mode; nil follows its grants again.
func (c *Client) SetMode(slot dataplane.Slot, mode *string) (agents.Agent, error) {
	var a agents.Agent
	return a, c.do(http.MethodPut, fmt.Sprintf("/v1/agents/%d/mode", slot), ModeRequest{Mode: mode}, &a)
}

func (c *Client) SetKilled(slot dataplane.Slot, killed bool) (agents.Agent, error) {
	var a agents.Agent
	return a, c.do(http.MethodPut, fmt.Sprintf("/v1/agents/%d/killed", slot), KilledRequest{Killed: &killed}, &a)
}

// StartTask starts a task on the agent.
func (c *Client) StartTask(slot dataplane.Slot, t TaskRequest) (agents.Agent, error) {
	var a agents.Agent
	return a, c.do(http.MethodPost, fmt.Sprintf("/v1/agents/%d/task", slot), t, &a)
}

// RenewTask renews the agent's task for ttl from now.
func (c *Client) RenewTask(slot dataplane.Slot, ttl string) (agents.Agent, error) {
	var a agents.Agent
	return a, c.do(http.MethodPut, fmt.Sprintf("/v1/agents/%d/task", slot), RenewRequest{TTL: ttl}, &a)
}

// TaskCredential is the current credential of the agent's task.
func (c *Client) TaskCredential(slot dataplane.Slot) (credentials.Credential, error) {
	var cred credentials.Credential
	return cred, c.do(http.MethodGet, fmt.Sprintf("/v1/agents/%d/task/credential", slot), nil, &cred)
}

// Heartbeat presents the task's current credential, renews the task for ttl and returns the
// next credential.
func (c *Client) Heartbeat(slot dataplane.Slot, presented, ttl string) (credentials.Credential, error) {
	var cred credentials.Credential
	return cred, c.do(http.MethodPost, fmt.Sprintf("/v1/agents/%d/task/heartbeat", slot), HeartbeatRequest{Credential: presented, TTL: ttl}, &cred)
}

// RevokedCredentials is the revocation list.
func (c *Client) RevokedCredentials() ([]credentials.Revocation, error) {
	var list []credentials.Revocation
	return list, c.do(http.MethodGet, "/v1/credentials/revoked", nil, &list)
}

// VerifyCredential checks a task credential and returns its claims.
func (c *Client) VerifyCredential(token string) (credentials.Claims, error) {
	var claims credentials.Claims
	return claims, c.do(http.MethodPost, "/v1/credentials/verify", VerifyRequest{Token: token}, &claims)
}

// Handoff hands the agent's task to another agent.
func (c *Client) Handoff(from dataplane.Slot, req HandoffRequest) (HandoffResult, error) {
	var res HandoffResult
	return res, c.do(http.MethodPost, fmt.Sprintf("/v1/agents/%d/task/handoff", from), req, &res)
}

// Events follows the decision records, filtered by SPIFFE ID and verdict (empty: all), calling
// f for each until it returns false, ctx ends or tetherd goes away. dropped is called when
// tetherd says this reader lost records.
func (c *Client) Events(ctx context.Context, spiffeID, verdict string, f func(events.Decision) bool, dropped func(uint64)) error {
	q := url.Values{}
	if spiffeID != "" {
		q.Set("spiffe_id", spiffeID)
	}
	if verdict != "" {
		q.Set("verdict", verdict)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://tetherd/v1/events?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	stream := &http.Client{Transport: c.http.Transport} // no timeout: it streams
	resp, err := stream.Do(req)
	if err != nil {
		return c.unreachable(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return remoteError(resp, b)
	}
	dec := json.NewDecoder(resp.Body)
	for {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			if ctx.Err() != nil || errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("reading the event stream: %w", err)
		}
		var lost struct {
			Dropped uint64 `json:"dropped"`
		}
		if json.Unmarshal(raw, &lost) == nil && lost.Dropped > 0 {
			if dropped != nil {
				dropped(lost.Dropped)
			}
			continue
		}
		var d events.Decision
		if err := json.Unmarshal(raw, &d); err != nil {
			return fmt.Errorf("reading the event stream: %w", err)
		}
		if !f(d) {
			return nil
		}
	}
}

// Kill runs the kill path on the agents req names.
func (c *Client) Kill(req KillRequest) ([]killpath.Kill, error) {
	var out []killpath.Kill
	return out, c.do(http.MethodPost, "/v1/kill", req, &out)
}

// Kills is the kills still being finished and the denied SPIFFE IDs.
func (c *Client) Kills() (KillStatus, error) {
	var out KillStatus
	return out, c.do(http.MethodGet, "/v1/kills", nil, &out)
}

// Resume thaws a killed agent for investigation (it stays denied).
func (c *Client) Resume(slot dataplane.Slot) (agents.Agent, error) {
	var a agents.Agent
	return a, c.do(http.MethodPost, fmt.Sprintf("/v1/agents/%d/resume", slot), nil, &a)
}

// Readmit takes a SPIFFE ID off the deny list.
func (c *Client) Readmit(id string) ([]agents.Agent, error) {
	var out []agents.Agent
	return out, c.do(http.MethodPost, "/v1/readmit", ReadmitRequest{SpiffeID: id}, &out)
}

// EndTask ends the agent's task.
func (c *Client) EndTask(slot dataplane.Slot) (agents.Agent, error) {
	var a agents.Agent
	return a, c.do(http.MethodDelete, fmt.Sprintf("/v1/agents/%d/task", slot), nil, &a)
}

// AddApproval records an approved step-up on the agent's task.
func (c *Client) AddApproval(slot dataplane.Slot, req ApprovalRequest) (agents.Agent, error) {
	var a agents.Agent
	return a, c.do(http.MethodPost, fmt.Sprintf("/v1/agents/%d/task/approvals", slot), req, &a)
}

// ReloadPolicy has tetherd read its policy again.
func (c *Client) ReloadPolicy() (policy.EngineStatus, error) {
	var st policy.EngineStatus
	return st, c.do(http.MethodPost, "/v1/policy/reload", struct{}{}, &st)
}

// EvalPolicy evaluates query for input with the policy in force.
func (c *Client) EvalPolicy(query string, input json.RawMessage) (json.RawMessage, error) {
	var out json.RawMessage
	return out, c.do(http.MethodPost, "/v1/policy/eval", PolicyEvalRequest{Query: query, Input: input}, &out)
}

// Approvals lists the step-up requests (admins).
func (c *Client) Approvals() ([]stepup.Request, error) {
	var out []stepup.Request
	return out, c.do("GET", "/v1/approvals", nil, &out)
}

// Approve approves a pending step-up request once (admins).
func (c *Client) Approve(id string, req ApproveRequest) (stepup.Request, error) {
	var out stepup.Request
	return out, c.do("POST", "/v1/approvals/"+url.PathEscape(id)+"/approve", req, &out)
}

// Deny denies a pending step-up request (admins).
func (c *Client) Deny(id string, req DenyRequest) (stepup.Request, error) {
	var out stepup.Request
	return out, c.do("POST", "/v1/approvals/"+url.PathEscape(id)+"/deny", req, &out)
}

// RequestStepup asks for an extra right for the caller's own agent (agent socket).
func (c *Client) RequestStepup(req StepupRequest) (stepup.Request, error) {
	var out stepup.Request
	return out, c.do("POST", "/v1/self/stepup", req, &out)
}

// MyStepups lists the caller's agent's step-up requests (agent socket).
func (c *Client) MyStepups() ([]stepup.Request, error) {
	var out []stepup.Request
	return out, c.do("GET", "/v1/self/stepup", nil, &out)
}

// Self is the caller's agent (agent socket).
func (c *Client) Self() (agents.Agent, error) {
	var out agents.Agent
	return out, c.do("GET", "/v1/self", nil, &out)
}

// RenewSelf renews the caller's own agent's task (agent socket), presenting its current
// credential, and returns the next one.
func (c *Client) RenewSelf(presented, ttl string) (credentials.Credential, error) {
	var cred credentials.Credential
	return cred, c.do(http.MethodPut, "/v1/self/task", HeartbeatRequest{Credential: presented, TTL: ttl}, &cred)
}

// Confinement is what the launcher does to the launched agent in slot before its command runs;
// keepCaps asks to keep a root agent's capabilities.
func (c *Client) Confinement(slot dataplane.Slot, keepCaps bool) (confine.Plan, error) {
	var plan confine.Plan
	path := fmt.Sprintf("/v1/agents/%d/confinement", slot)
	if keepCaps {
		path += "?keep_caps=true"
	}
	return plan, c.do(http.MethodGet, path, nil, &plan)
}

// RecordRefusal reports a system call the launcher's filter refused to the agent in slot.
func (c *Client) RecordRefusal(slot dataplane.Slot, r RefusalRequest) error {
	return c.do(http.MethodPost, fmt.Sprintf("/v1/agents/%d/refusals", slot), r, nil)
}
