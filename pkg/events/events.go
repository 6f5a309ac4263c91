// Package events turns the kernel's decision events into decision records attributed to agents
// (SPIFFE ID, mode, tool chain) and writes them as JSON lines. Enforcement never waits on a slow
// sink: when the sinks fall behind, the pump stops reading, the events wait in the kernel's ring
// buffer, and what does not fit there the kernel drops and counts. Every event is thus either
// written or counted lost, in one place. Telemetry sinks (metrics, webhooks, the live stream)
// take records from here.
package events

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	gojson "github.com/goccy/go-json"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// Decision is one kernel decision, attributed. Its JSON form is the decision log line.
type Decision struct {
	DecisionID   string          `json:"decision_id"`
	Timestamp    time.Time       `json:"timestamp"`
	SpiffeID     string          `json:"spiffe_id,omitempty"`
	Slot         *dataplane.Slot `json:"agent_slot,omitempty"`
	TaskID       string          `json:"task_id,omitempty"`
	TaskType     string          `json:"task_type,omitempty"`
	CgroupID     uint64          `json:"cgroup_id"`
	PID          uint32          `json:"pid"`
	TID          uint32          `json:"tid"`
	UID          uint32          `json:"uid"`
	Comm         string          `json:"comm"`
	Binary       string          `json:"binary,omitempty"`
	BinaryFile   string          `json:"binary_file,omitempty"` // dev:inode
	ParentChain  []Parent        `json:"parent_chain,omitempty"`
	Kind         RecordKind      `json:"kind"`
	Protocol     string          `json:"protocol,omitempty"`
	Destination  string          `json:"destination,omitempty"`
	Executable   string          `json:"executable,omitempty"`
	SocketPath   string          `json:"socket_path,omitempty"`
	SocketFamily uint16          `json:"socket_family,omitempty"`
	SocketType   uint32          `json:"socket_type,omitempty"`
	SocketOption string          `json:"socket_option,omitempty"` // kind sockopt: IPV6_RTHDR, IP_OPTIONS, ...
	Syscall      string          `json:"syscall,omitempty"`       // kind syscall: the call the launcher's filter refused; kind guard: what the LSM guard refused
	// Cgroup is, for kind migrate, the cgroup the agent process was moved to, and Killed whether
	// the kernel killed it then (else tetherd did, or the record says why not).
	Cgroup string `json:"cgroup,omitempty"`
	Killed bool   `json:"killed,omitempty"`
	// Node is the node (host) whose tetherd wrote the record: every record has it.
	Node string `json:"node,omitempty"`
	// Kubernetes names the pod and container of the process, for an agent that is a pod.
	Kubernetes     *PodRef `json:"kubernetes,omitempty"`
	Verdict        Verdict `json:"verdict"`
	Reason         Reason  `json:"reason"`
	Mode           string  `json:"mode,omitempty"`
	RuleGeneration uint64  `json:"rule_generation"`
	// PolicyRevision is the policy revision in force when tetherd wrote the record (the rule
	// generation says which install of the agent's rules decided).
	PolicyRevision string `json:"policy_revision,omitempty"`
	// Response is what the respond policy said of a denied or audited decision.
	Response Response `json:"response,omitempty"`
	// Kill is the kill path's record (kind "kill").
	Kill *Kill `json:"kill,omitempty"`
	// Policy is a policy evaluation's record (kind "policy").
	Policy *Evaluation `json:"policy,omitempty"`
	// Stepup is a step of a step-up request (kind "stepup"; verdict pending, approved, denied
	// or refused).
	Stepup *Stepup `json:"stepup,omitempty"`
	// DNS is a query an agent sent and what the DNS proxy did with it (kind "dns": verdict
	// allow with reason rule, deny or audit-deny with reason no-rule, or error).
	DNS *DNSQuery `json:"dns,omitempty"`
}

// DNSQuery is what a dns record says of a query and its answer.
type DNSQuery struct {
	Name     string `json:"name"`
	Type     string `json:"type"`               // A, AAAA, ...
	Protocol string `json:"protocol"`           // udp or tcp
	Resolver string `json:"resolver,omitempty"` // where the agent sent it (the proxy took it)
	// Grant is the fqdn of the agent's grant that covers the name (exact, or *.domain).
	Grant string `json:"grant,omitempty"`
	// Rcode is the answer's response code (NOERROR, NXDOMAIN, REFUSED, SERVFAIL, ...).
	Rcode string `json:"rcode"`
	// Answers are the answer's addresses, installed as the agent's host rules for TTL seconds
	// (the answer's shortest, bounded) before the agent got it.
	Answers []string `json:"answers,omitempty"`
	TTL     uint32   `json:"ttl,omitempty"`
	// InstallNs is how long installing them took.
	InstallNs int64  `json:"install_ns,omitempty"`
	Error     string `json:"error,omitempty"`
}

// Stepup is what a step-up record says of the request.
type Stepup struct {
	RequestID  string `json:"request_id,omitempty"`
	Action     string `json:"action"`
	Resource   string `json:"resource"`
	Reason     string `json:"reason,omitempty"`
	DecidedBy  string `json:"decided_by,omitempty"`
	ApprovalID string `json:"approval_id,omitempty"`
	Uses       int64  `json:"uses,omitempty"`
}

// Evaluation is one evaluation of a policy query: what it was asked and what it answered. The
// pump turns Input and Result into JSON objects and erases the masked input fields before any
// sink sees them (Erased lists what was there and was erased, like OPA's decision log).
type Evaluation struct {
	Query      string   `json:"query"`
	Input      any      `json:"input"`
	Result     any      `json:"result,omitempty"`
	Error      string   `json:"error,omitempty"`
	DurationNs int64    `json:"duration_ns"`
	Erased     []string `json:"erased,omitempty"`
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
	Name  string        `json:"name"`
	Done  bool          `json:"done"`
	Took  time.Duration `json:"took_ns"`
	Error string        `json:"error,omitempty"`
}

// Parent is one process of the chain that led to the decision, nearest first.
type Parent struct {
	PID        uint32 `json:"pid"`
	Comm       string `json:"comm"`
	BinaryFile string `json:"binary_file,omitempty"`
}

// PodRef is where on Kubernetes a record's process runs.
type PodRef struct {
	Node      string `json:"node"`
	Namespace string `json:"namespace"`
	Pod       string `json:"pod"`
	// Container is empty for the pod's sandbox (and a container the pod's status does not list
	// yet).
	Container string `json:"container,omitempty"`
}

// Attributor names the agent in a kernel slot.
type Attributor interface {
	Identity(slot dataplane.Slot) (spiffeID string, mode dataplane.Mode, ok bool)
}

// Build attributes a kernel event.
func Build(e dataplane.Event, attr Attributor) Decision {
	d := Decision{
		DecisionID:     NewID(),
		Timestamp:      e.Time.UTC(),
		CgroupID:       e.CgroupID,
		PID:            e.PID,
		TID:            e.TID,
		UID:            e.UID,
		Comm:           e.Comm,
		Binary:         e.BinaryPath,
		Kind:           KernelKind(e.Kind),
		Verdict:        KernelVerdict(e.Verdict),
		Reason:         KernelReason(e.Reason),
		RuleGeneration: e.Generation,
	}
	if !e.Binary.IsZero() {
		d.BinaryFile = fileString(e.Binary)
	}
	if e.Slot != dataplane.NoSlot {
		s := e.Slot
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
	case dataplane.KindConnect4, dataplane.KindConnect6, dataplane.KindSendmsg4, dataplane.KindSendmsg6,
		dataplane.KindPacket, dataplane.KindTerminate, dataplane.KindBind: // bind: the local address
		d.Protocol = e.Proto.String()
		if e.Addr.IsValid() {
			d.Destination = netip.AddrPortFrom(e.Addr, e.Port).String()
		}
	case dataplane.KindSockopt:
		d.SocketOption = e.Target
	case dataplane.KindConnectUnix, dataplane.KindSendmsgUnix:
		d.SocketPath = e.Target
	case dataplane.KindExec:
		d.Executable = e.Target
	case dataplane.KindSocket:
		proto := uint32(e.Proto)
		if e.SockProto != 0 {
			proto = e.SockProto // IPPROTO_MPTCP (262) does not fit Proto
		}
		d.SocketFamily, d.SocketType, d.Protocol = e.Family, e.SockType, strconv.Itoa(int(proto))
	case dataplane.KindMigrate:
		d.Cgroup, d.Killed = e.Target, e.Killed
	case dataplane.KindGuard:
		d.Syscall = e.Target
		if e.Reason == dataplane.ReasonPtrace {
			d.Syscall = "ptrace " + e.Target // the traced process's command
		}
	}
	return d
}

func fileString(f dataplane.FileID) string {
	var b [41]byte
	return string(strconv.AppendUint(append(strconv.AppendUint(b[:0], uint64(f.Dev), 10), ':'), f.Ino, 10))
}

// ParseFileID reads a record's binary_file ("dev:inode").
func ParseFileID(s string) (dataplane.FileID, bool) {
	dev, ino, ok := strings.Cut(s, ":")
	d, err1 := strconv.ParseUint(dev, 10, 64)
	i, err2 := strconv.ParseUint(ino, 10, 64)
	return dataplane.FileID{Dev: d, Ino: i}, ok && err1 == nil && err2 == nil
}

// Target is what the record is about: its destination, executable, socket path, socket option,
// system call or cgroup (a record has one of them).
func (d Decision) Target() string {
	return d.Destination + d.Executable + d.SocketPath + d.SocketOption + d.Syscall + d.Cgroup
}

// NewID is a new decision ID: 16 random bytes, hex.
func NewID() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Source yields kernel events; pkg/kernel's EventReader is one.
type Source interface {
	Read() (dataplane.Event, error)
}

// Settling is a source that keeps count of the events whose records were settled (flushed to
// the sinks, or counted lost) where it outlives this process, and counted at its opening those an
// earlier reader took and never settled (killed before it wrote them): lost.
type Settling interface {
	Ack(n int) error
	Unsettled() uint64
}

// Buffering is a source that can tell whether more events are waiting; the pump then writes
// them before it flushes the sinks.
type Buffering interface {
	Buffered() int
}

// Sink receives every decision record, in order, from one goroutine.
type Sink interface {
	Write(Decision) error
}

// Flusher is a sink that buffers: the pump calls Flush whenever it has nothing more to write.
type Flusher interface {
	Flush() error
}

// Stats count what the pump passed on and what it could not.
type Stats struct {
	Read uint64 `json:"read"`
	// Written are records handed to the sinks (the kernel's and tetherd's own).
	Written uint64 `json:"written"`
	// RecordsDropped are records tetherd made itself (Record: policy evaluations) dropped
	// because their queue was full.
	RecordsDropped uint64 `json:"records_dropped"`
	// LostAtStart are kernel records the previous tetherd had read and not written when it
	// ended without flushing (killed), counted at this one's start.
	LostAtStart   uint64 `json:"lost_at_start"`
	DecodeErrors  uint64 `json:"decode_errors"`
	SinkErrors    uint64 `json:"sink_errors"`
	QueueCapacity int    `json:"queue_capacity"`
}

// Pump moves events from a source to sinks through a bounded queue; a full queue stops the
// reading. The reader hands events over in batches of what the source holds (up to maxBatch), so
// that a steady stream costs one hand-over, and one wake-up of the writer, per batch.
type Pump struct {
	// Annotate, if set, completes each record before the sinks get it (off the ring buffer's
	// reader, so it may take its time: the queue absorbs it, or drops and counts).
	Annotate func(*Decision)
	// Node is written into every record that names none (set before Run).
	Node string

	src    Source
	attr   Attributor
	sinkMu sync.Mutex
	sinks  []Sink
	log    *slog.Logger
	queue  chan []dataplane.Event
	own    chan Decision // tetherd's own records (Record), written by Run's writer
	mask   []Pointer

	read, written, ownDropped, decodeErrors, sinkErrors atomic.Uint64
	// unacked counts the kernel's events taken since the last Ack of a Settling source: written
	// to the sinks (settled by the next flush) or not decoded.
	unacked     atomic.Uint64
	lostAtStart uint64
	ackFailed   atomic.Bool
}

// NewPump returns a pump with a queue of about queueLen events.
func NewPump(src Source, attr Attributor, queueLen int, log *slog.Logger, sinks ...Sink) *Pump {
	p := &Pump{src: src, attr: attr, sinks: sinks, log: log, queue: make(chan []dataplane.Event, max(queueLen/maxBatch, 1)),
		own: make(chan Decision, ownQueue)}
	if s, ok := src.(Settling); ok {
		if p.lostAtStart = s.Unsettled(); p.lostAtStart > 0 {
			log.Warn("records the previous tetherd read from the kernel and had not written when it ended (killed): counted lost", "records", p.lostAtStart)
		}
	}
	return p
}

// maxBatch bounds the events the reader hands over at once.
const maxBatch = 256

// ownQueue bounds the records tetherd made itself that wait for the writer.
const ownQueue = 4096

// SetMask sets the input fields erased from policy evaluation records (see ParseMask).
func (p *Pump) SetMask(mask []Pointer) {
	p.sinkMu.Lock()
	p.mask = mask
	p.sinkMu.Unlock()
}

// Stats returns the pump's counters.
func (p *Pump) Stats() Stats {
	return Stats{Read: p.read.Load(), Written: p.written.Load(), RecordsDropped: p.ownDropped.Load(), DecodeErrors: p.decodeErrors.Load(),
		SinkErrors: p.sinkErrors.Load(), QueueCapacity: cap(p.queue) * maxBatch, LostAtStart: p.lostAtStart}
}

// Emit writes a record tetherd made itself (not from the kernel: an agent lost its identity)
// to the sinks, in line with the kernel's records.
func (p *Pump) Emit(d Decision) {
	if d.DecisionID == "" {
		d.DecisionID = NewID()
	}
	if d.Timestamp.IsZero() {
		d.Timestamp = time.Now().UTC()
	}
	p.write(d)
	p.flush() // rare records, wanted at once (a kill, a lost identity)
}

// Record queues a record tetherd made itself for the writer of Run without waiting for the
// sinks (a policy evaluation, made while an agent's lock is held). When the queue is full the
// record is dropped and counted.
func (p *Pump) Record(d Decision) {
	if d.DecisionID == "" {
		d.DecisionID = NewID()
	}
	if d.Timestamp.IsZero() {
		d.Timestamp = time.Now().UTC()
	}
	select {
	case p.own <- d:
	default:
		p.ownDropped.Add(1)
	}
}

func (p *Pump) write(d Decision) {
	p.sinkMu.Lock()
	defer p.sinkMu.Unlock()
	if d.Policy != nil {
		d.Policy = p.prepare(*d.Policy)
	}
	if d.Node == "" {
		d.Node = p.Node
	}
	p.written.Add(1)
	for _, s := range p.sinks {
		if err := s.Write(d); err != nil {
			p.sinkFailed(err)
		}
	}
}

// Run reads until the source ends (stop it by closing the source), then drains the queue.
func (p *Pump) Run(closed error) error {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case batch, ok := <-p.queue:
				if !ok {
					p.drainOwn()
					p.ack()
					return
				}
				for _, e := range batch {
					d := Build(e, p.attr)
					if p.Annotate != nil {
						p.Annotate(&d)
					}
					p.write(d)
				}
				p.unacked.Add(uint64(len(batch)))
			case d := <-p.own:
				p.write(d)
			}
			if len(p.queue) == 0 && len(p.own) == 0 && !p.pending() {
				p.flush()
				p.ack()
			}
		}
	}()
	defer func() {
		close(p.queue)
		wg.Wait()
	}()
	failing := 0
	var batch []dataplane.Event
	for {
		e, err := p.src.Read()
		switch {
		case errors.Is(err, closed):
			if len(batch) > 0 {
				p.queue <- batch
			}
			return nil
		case err != nil:
			p.unacked.Add(1) // settled: counted
			if p.decodeErrors.Add(1) == 1 {
				p.log.Error("reading kernel event", "error", err)
			}
			// A record that does not decode is skipped; a source that keeps failing is not
			// spun on.
			if failing++; failing > 10 {
				time.Sleep(100 * time.Millisecond)
			}
		default:
			failing = 0
			p.read.Add(1)
			batch = append(batch, e)
		}
		if len(batch) == maxBatch || len(batch) > 0 && !p.pending() {
			p.queue <- batch // when the sinks fall behind, events wait in the ring buffer
			batch = nil
		}
	}
}

// ack tells a Settling source that the kernel's events taken so far are settled: written to the
// sinks, which have just flushed, or counted lost. Call from the writer, after a flush.
func (p *Pump) ack() {
	s, ok := p.src.(Settling)
	if !ok {
		return
	}
	n := p.unacked.Swap(0)
	if err := s.Ack(int(n)); err != nil {
		p.unacked.Add(n) // with the next
		if !p.ackFailed.Swap(true) {
			p.log.Warn("recording settled records (a restart after a kill would count them lost)", "error", err)
		}
	}
}

// drainOwn writes the records of Record still queued.
func (p *Pump) drainOwn() {
	defer p.flush()
	for {
		select {
		case d := <-p.own:
			p.write(d)
		default:
			return
		}
	}
}

// pending reports whether the source has events waiting to be read.
func (p *Pump) pending() bool {
	b, ok := p.src.(Buffering)
	return ok && b.Buffered() > 0
}

// sinkFailed counts the records a sink lost: one, or those of a failed flush (a write that
// flushes fails the same way). Call with p.sinkMu held.
func (p *Pump) sinkFailed(err error) {
	n := uint64(1)
	var fe *FlushError
	if errors.As(err, &fe) {
		n = uint64(fe.Records)
	}
	if p.sinkErrors.Add(n) == n {
		p.log.Error("decision sink failed", "error", err)
	}
}

// flush has the buffering sinks write what they hold.
func (p *Pump) flush() {
	p.sinkMu.Lock()
	defer p.sinkMu.Unlock()
	for _, s := range p.sinks {
		if f, ok := s.(Flusher); ok {
			if err := f.Flush(); err != nil {
				p.sinkFailed(err)
			}
		}
	}
}

// lineEncoder encodes records as JSON lines into a buffer it reuses: no allocation per record.
// go-json writes what encoding/json writes (TestLineIsEncodingJSON), in a fraction of its time:
// the log's encoding was the largest part of the daemon's cost per event (docs/performance.md).
type lineEncoder struct {
	buf bytes.Buffer
	enc *gojson.Encoder
}

// encode returns d's line, newline included, valid until the next call.
func (l *lineEncoder) encode(d Decision) ([]byte, error) {
	if l.enc == nil {
		l.enc = gojson.NewEncoder(&l.buf)
	}
	l.buf.Reset()
	if err := l.enc.Encode(d); err != nil {
		return nil, err
	}
	return l.buf.Bytes(), nil
}

// JSONLines writes one JSON object per line to w, buffered until the pump has nothing more to
// write (Flush), so a reader sees each decision as it happens unless more follow at once.
type JSONLines struct {
	mu   sync.Mutex
	w    *bufio.Writer
	line lineEncoder
}

func NewJSONLines(w io.Writer) *JSONLines { return &JSONLines{w: bufio.NewWriter(w)} }

func (j *JSONLines) Write(d Decision) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	b, err := j.line.encode(d)
	if err != nil {
		return err
	}
	_, err = j.w.Write(b)
	return err
}

// Flush writes what is buffered.
func (j *JSONLines) Flush() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.w.Flush()
}
