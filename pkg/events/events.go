// Package events turns the kernel's decision events into decision records attributed to agents
// (SPIFFE ID, mode, tool chain) and writes them as JSON lines. Reading the ring buffer never waits
// on a slow sink: records that do not fit in the queue are dropped and counted. Telemetry sinks
// (metrics, webhooks, the live stream) take records from here.
package events

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// Decision is one kernel decision, attributed. Its JSON form is the decision log line.
type Decision struct {
	DecisionID     string    `json:"decision_id"`
	Timestamp      time.Time `json:"timestamp"`
	SpiffeID       string    `json:"spiffe_id,omitempty"`
	Slot           *uint32   `json:"agent_slot,omitempty"`
	TaskID         string    `json:"task_id,omitempty"`
	TaskType       string    `json:"task_type,omitempty"`
	CgroupID       uint64    `json:"cgroup_id"`
	PID            uint32    `json:"pid"`
	TID            uint32    `json:"tid"`
	UID            uint32    `json:"uid"`
	Comm           string    `json:"comm"`
	Binary         string    `json:"binary,omitempty"`
	BinaryFile     string    `json:"binary_file,omitempty"` // dev:inode
	ParentChain    []Parent  `json:"parent_chain,omitempty"`
	Kind           string    `json:"kind"`
	Protocol       string    `json:"protocol,omitempty"`
	Destination    string    `json:"destination,omitempty"`
	Executable     string    `json:"executable,omitempty"`
	SocketPath     string    `json:"socket_path,omitempty"`
	SocketFamily   uint16    `json:"socket_family,omitempty"`
	SocketType     uint32    `json:"socket_type,omitempty"`
	Verdict        string    `json:"verdict"`
	Reason         string    `json:"reason"`
	Mode           string    `json:"mode,omitempty"`
	RuleGeneration uint64    `json:"rule_generation"`
	// PolicyRevision is the policy revision in force when tetherd wrote the record (the rule
	// generation says which install of the agent's rules decided).
	PolicyRevision string `json:"policy_revision,omitempty"`
	// Response is what the respond policy said of a denied or audited decision.
	Response string `json:"response,omitempty"`
	// Kill is the kill path's record (kind "kill").
	Kill *Kill `json:"kill,omitempty"`
}

// Kill is what the kill path did: each step and how long it took.
type Kill struct {
	ID        string     `json:"id"`
	Requester string     `json:"requester"`
	Terminate bool       `json:"terminate"`
	Done      bool       `json:"done"`
	Steps     []KillStep `json:"steps"`
}

// KillStep is one step of a kill.
type KillStep struct {
	Name   string `json:"name"`
	Done   bool   `json:"done"`
	TookNs int64  `json:"took_ns"`
	Error  string `json:"error,omitempty"`
}

// Parent is one process of the chain that led to the decision, nearest first.
type Parent struct {
	PID        uint32 `json:"pid"`
	Comm       string `json:"comm"`
	BinaryFile string `json:"binary_file,omitempty"`
}

// Attributor names the agent in a kernel slot.
type Attributor interface {
	Identity(slot dataplane.Slot) (spiffeID string, mode dataplane.Mode, ok bool)
}

// Build attributes a kernel event.
func Build(e dataplane.Event, attr Attributor) Decision {
	d := Decision{
		DecisionID:     newID(),
		Timestamp:      e.Time.UTC(),
		CgroupID:       e.CgroupID,
		PID:            e.PID,
		TID:            e.TID,
		UID:            e.UID,
		Comm:           e.Comm,
		Binary:         e.BinaryPath,
		Kind:           e.Kind.String(),
		Verdict:        e.Verdict.String(),
		Reason:         e.Reason.String(),
		RuleGeneration: e.Generation,
	}
	if !e.Binary.IsZero() {
		d.BinaryFile = fileString(e.Binary)
	}
	if e.Slot != dataplane.NoSlot {
		s := uint32(e.Slot)
		d.Slot = &s
		if id, mode, ok := attr.Identity(e.Slot); ok {
			d.SpiffeID, d.Mode = id, mode.String()
		}
	}
	for _, p := range e.Chain {
		par := Parent{PID: p.PID, Comm: p.Comm}
		if !p.Binary.IsZero() {
			par.BinaryFile = fileString(p.Binary)
		}
		d.ParentChain = append(d.ParentChain, par)
	}
	switch e.Kind {
	case dataplane.KindConnect4, dataplane.KindConnect6, dataplane.KindSendmsg4, dataplane.KindSendmsg6:
		d.Protocol = e.Proto.String()
		if e.Addr.IsValid() {
			d.Destination = netip.AddrPortFrom(e.Addr, e.Port).String()
		}
	case dataplane.KindConnectUnix, dataplane.KindSendmsgUnix:
		d.SocketPath = e.Target
	case dataplane.KindExec:
		d.Executable = e.Target
	case dataplane.KindSocket:
		d.SocketFamily, d.SocketType, d.Protocol = e.Family, e.SockType, strconv.Itoa(int(e.Proto))
	}
	return d
}

func fileString(f dataplane.FileID) string { return fmt.Sprintf("%d:%d", f.Dev, f.Ino) }

func newID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Source yields kernel events; pkg/kernel's EventReader is one.
type Source interface {
	Read() (dataplane.Event, error)
}

// Sink receives every decision record, in order, from one goroutine.
type Sink interface {
	Write(Decision) error
}

// Stats count what the pump could not pass on.
type Stats struct {
	Read          uint64 `json:"read"`
	Dropped       uint64 `json:"dropped"` // queue full: sinks too slow
	DecodeErrors  uint64 `json:"decode_errors"`
	SinkErrors    uint64 `json:"sink_errors"`
	QueueCapacity int    `json:"queue_capacity"`
}

// Pump moves events from a source to sinks through a bounded queue.
type Pump struct {
	// Annotate, if set, completes each record before the sinks get it (off the ring buffer's
	// reader, so it may take its time: the queue absorbs it, or drops and counts).
	Annotate func(*Decision)

	src    Source
	attr   Attributor
	sinkMu sync.Mutex
	sinks  []Sink
	log    *slog.Logger
	queue  chan dataplane.Event

	read, dropped, decodeErrors, sinkErrors atomic.Uint64
}

// NewPump returns a pump with a queue of queueLen events.
func NewPump(src Source, attr Attributor, queueLen int, log *slog.Logger, sinks ...Sink) *Pump {
	return &Pump{src: src, attr: attr, sinks: sinks, log: log, queue: make(chan dataplane.Event, queueLen)}
}

// Stats returns the pump's counters.
func (p *Pump) Stats() Stats {
	return Stats{Read: p.read.Load(), Dropped: p.dropped.Load(), DecodeErrors: p.decodeErrors.Load(),
		SinkErrors: p.sinkErrors.Load(), QueueCapacity: cap(p.queue)}
}

// Emit writes a record tetherd made itself (not from the kernel: an agent lost its identity)
// to the sinks, in line with the kernel's records.
func (p *Pump) Emit(d Decision) {
	if d.DecisionID == "" {
		d.DecisionID = newID()
	}
	if d.Timestamp.IsZero() {
		d.Timestamp = time.Now().UTC()
	}
	p.write(d)
}

func (p *Pump) write(d Decision) {
	p.sinkMu.Lock()
	defer p.sinkMu.Unlock()
	for _, s := range p.sinks {
		if err := s.Write(d); err != nil {
			if p.sinkErrors.Add(1) == 1 {
				p.log.Error("decision sink failed", "error", err)
			}
		}
	}
}

// Run reads until the source ends (stop it by closing the source), then drains the queue.
func (p *Pump) Run(closed error) error {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for e := range p.queue {
			d := Build(e, p.attr)
			if p.Annotate != nil {
				p.Annotate(&d)
			}
			p.write(d)
		}
	}()
	defer func() {
		close(p.queue)
		wg.Wait()
	}()
	failing := 0
	for {
		e, err := p.src.Read()
		if errors.Is(err, closed) {
			return nil
		}
		if err != nil {
			if p.decodeErrors.Add(1) == 1 {
				p.log.Error("reading kernel event", "error", err)
			}
			// A record that does not decode is skipped; a source that keeps failing is not
			// spun on.
			if failing++; failing > 10 {
				time.Sleep(100 * time.Millisecond)
			}
			continue
		}
		failing = 0
		p.read.Add(1)
		select {
		case p.queue <- e:
		default:
			p.dropped.Add(1)
		}
	}
}

// JSONLines writes one JSON object per line to w, flushing after every line so a reader sees
// each decision as it happens.
type JSONLines struct {
	mu sync.Mutex
	w  *bufio.Writer
}

func NewJSONLines(w io.Writer) *JSONLines { return &JSONLines{w: bufio.NewWriter(w)} }

func (j *JSONLines) Write(d Decision) error {
	b, err := json.Marshal(d)
	if err != nil {
		return err
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	j.w.Write(b)
	j.w.WriteByte('\n')
	return j.w.Flush()
}
