package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/cilium/ebpf/ringbuf"
	"golang.org/x/sys/unix"

	"github.com/tether-sh/tether/pkg/bootclock"
	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/panics"
)

// ErrClosed is returned by EventReader.Read after Close.
var ErrClosed = errors.New("event reader closed")

// EventReader decodes the decisions the programs write to the ring buffer.
//
// It waits for events in Go's network poller, on its own descriptor of the ring buffer, rather
// than in a blocking epoll_wait: a goroutine parked there holds no thread, so a quiet ring buffer
// costs nothing and a slow trickle does not keep the runtime's monitor polling. Once woken in a
// stream of events (within streamGap of the last wake), it lets batchDelay pass before reading:
// the kernel wakes a reader only when it has caught up, so the events of that time are read in
// one go, for one wake-up.
type EventReader struct {
	k        *Kernel
	rd       *ringbuf.Reader
	rec      ringbuf.Record
	file     *os.File // the ring buffer's descriptor, in the poller
	raw      syscall.RawConn
	lastWake time.Time
	mu       sync.RWMutex // Close waits for a Read in progress on the ring (mapped memory)
	closed   bool
	closing  atomic.Bool // set before the file is closed, so the wait it ends knows why
	// settled is tether_settled's count, which this reader advances (Ack); unsettled is what
	// earlier readers had read and not settled, counted at open.
	settled, unsettled uint64
}

const (
	streamGap  = 25 * time.Millisecond
	batchDelay = 10 * time.Millisecond
)

// NewEventReader opens the pinned ring buffer. Events that arrived while no daemon was reading
// are still in it, up to its size; what did not fit is counted in Counters().RingBufferDrops.
func (k *Kernel) NewEventReader() (*EventReader, error) {
	rd, err := ringbuf.NewReader(k.events)
	if err != nil {
		return nil, fmt.Errorf("opening event ring buffer: %w", err)
	}
	fd, err := unix.FcntlInt(uintptr(k.events.FD()), unix.F_DUPFD_CLOEXEC, 0)
	if err == nil {
		err = unix.SetNonblock(fd, true)
	}
	if err != nil {
		rd.Close()
		return nil, fmt.Errorf("opening event ring buffer: %w", err)
	}
	f := os.NewFile(uintptr(fd), "tether_events")
	raw, err := f.SyscallConn()
	if err != nil {
		f.Close()
		rd.Close()
		return nil, fmt.Errorf("opening event ring buffer: %w", err)
	}
	r := &EventReader{k: k, rd: rd, file: f, raw: raw}
	if err := r.countUnsettled(); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// ringRecord is the ring buffer's space for one record: a tether_event and the ring's 8-byte
// header, in 8-byte units.
var ringRecord = uint64((binary.Size(bpfTetherEvent{}) + 8 + 7) &^ 7)

// countUnsettled finds what earlier readers read from the ring buffer and never settled (see
// tether_settled): every record the programs submitted was settled, is still in the ring, or is
// that. Programs that submit meanwhile move the count: it is taken when the submitted count reads
// the same before and after the ring's fill. The unsettled records are then settled, as lost.
func (r *EventReader) countUnsettled() error {
	if err := r.k.settled.Lookup(uint32(0), &r.settled); err != nil {
		return fmt.Errorf("reading the settled records count: %w", err)
	}
	for range 100 {
		before, err := r.k.counter(bpfTetherCounterTETHER_COUNTER_EVENTS_SUBMITTED)
		if err != nil {
			return err
		}
		inRing := uint64(r.rd.AvailableBytes()) / ringRecord
		after, err := r.k.counter(bpfTetherCounterTETHER_COUNTER_EVENTS_SUBMITTED)
		if err != nil {
			return err
		}
		if before == after {
			if before > r.settled+inRing {
				r.unsettled = before - r.settled - inRing
			}
			return r.Ack(int(r.unsettled))
		}
		time.Sleep(time.Millisecond)
	}
	return nil // a ring this busy: counted at the next start
}

// Ack records that n more of the records read are settled: written to the sinks (flushed) or
// counted lost. The count lives in a pinned map, where the next reader finds it (Unsettled).
func (r *EventReader) Ack(n int) error {
	if n == 0 {
		return nil
	}
	r.settled += uint64(n)
	if err := r.k.settled.Put(uint32(0), r.settled); err != nil {
		return fmt.Errorf("recording settled records: %w", err)
	}
	return nil
}

// Unsettled is how many records earlier readers of the ring buffer read and never settled (a
// tetherd killed before it wrote them), counted when this reader opened: they are lost.
func (r *EventReader) Unsettled() uint64 { return r.unsettled }

// Read blocks until the next event. After Close it returns ErrClosed.
func (r *EventReader) Read() (dataplane.Event, error) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.closed {
		return dataplane.Event{}, ErrClosed
	}
	if r.rd.AvailableBytes() == 0 {
		// Close may come meanwhile: it closes the file first, which ends the wait.
		r.mu.RUnlock()
		err := r.wait()
		r.mu.RLock()
		if r.closed || r.closing.Load() {
			return dataplane.Event{}, ErrClosed
		}
		if err != nil {
			return dataplane.Event{}, err
		}
	}
	if err := r.rd.ReadInto(&r.rec); err != nil {
		if errors.Is(err, ringbuf.ErrClosed) || errors.Is(err, os.ErrClosed) {
			return dataplane.Event{}, ErrClosed
		}
		return dataplane.Event{}, fmt.Errorf("reading event ring buffer: %w", err)
	}
	return decodeEvent(r.rec.RawSample, bootclock.Epoch())
}

// BoundaryEvent counts the ring buffer records whose decoding panicked (see panics).
var BoundaryEvent = panics.Declare("kernel event")

// decodeEvent is DecodeEvent with a panic turned into an error, counted: the record is skipped
// like one that does not decode.
func decodeEvent(raw []byte, boot time.Time) (ev dataplane.Event, err error) {
	defer panics.Catch(BoundaryEvent, &err)
	return DecodeEvent(raw, boot)
}

// Buffered is how many bytes of events wait in the ring buffer.
func (r *EventReader) Buffered() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	if r.closed {
		return 0
	}
	return r.rd.AvailableBytes()
}

// wait parks until the ring buffer has an event.
func (r *EventReader) wait() error {
	err := r.raw.Read(func(uintptr) bool {
		r.mu.RLock()
		defer r.mu.RUnlock()
		return r.closed || r.rd.AvailableBytes() > 0
	})
	if err != nil {
		return fmt.Errorf("waiting for the event ring buffer: %w", err)
	}
	now := time.Now()
	if now.Sub(r.lastWake) < streamGap {
		time.Sleep(batchDelay)
	}
	r.lastWake = now
	return nil
}

// Fill is how full the ring buffer is: bytes written and not yet read, of its size.
func (r *EventReader) Fill() dataplane.MapFill {
	return dataplane.MapFill{Entries: r.Buffered(), Capacity: r.rd.BufferSize()}
}

// Close stops Read.
func (r *EventReader) Close() error {
	r.closing.Store(true)
	ferr := r.file.Close() // ends a wait
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	return errors.Join(ferr, r.rd.Close())
}

var eventSize = binary.Size(bpfTetherEvent{})

// DecodeEvent decodes one ring buffer record. boot is the wall-clock time of boot. The record is
// read in place (bpf2go's struct has the C layout, padding included: TestEventLayout), not
// through encoding/binary's reflection, which cost most of the daemon's time per event.
func DecodeEvent(raw []byte, boot time.Time) (dataplane.Event, error) {
	if len(raw) < eventSize {
		return dataplane.Event{}, fmt.Errorf("event of %d bytes, want %d", len(raw), eventSize)
	}
	e := (*bpfTetherEvent)(unsafe.Pointer(unsafe.SliceData(raw)))
	out := dataplane.Event{
		Time:       boot.Add(time.Duration(e.TsBootNs)),
		Generation: e.Generation,
		CgroupID:   e.CgroupId,
		Slot:       dataplane.Slot(e.Slot),
		PID:        e.Pid,
		TID:        e.Tid,
		UID:        e.Uid,
		Kind:       dataplane.Kind(e.Kind),
		Verdict:    dataplane.Verdict(e.Verdict),
		Reason:     dataplane.Reason(e.Reason),
		Proto:      dataplane.Proto(e.Proto),
		Family:     e.Family,
		SockType:   e.SockType,
		SockProto:  e.SockProto,
		Port:       e.Dport,
		Comm:       cString(e.Comm[:]),
		BinaryPath: cString(e.Binary[:]),
		Target:     cString(e.Target[:]),
	}
	if e.BinIno != 0 {
		out.Binary = dataplane.FileID{Dev: userDev(e.BinDev), Ino: e.BinIno}
	}
	switch out.Kind {
	case dataplane.KindConnect4, dataplane.KindConnect6, dataplane.KindSendmsg4, dataplane.KindSendmsg6,
		dataplane.KindPacket, dataplane.KindTerminate, dataplane.KindBind:
		out.Addr = netip.AddrFrom16(e.Daddr).Unmap()
	case dataplane.KindMigrate:
		// The programs put whether they killed the moved process where a protocol goes.
		out.Killed, out.Proto = e.Proto != 0, 0
	case dataplane.KindSockopt:
		out.Target = sockoptName(e.Family, e.Dport)
	}
	n := min(int(e.ChainLen), len(e.Chain))
	for _, c := range e.Chain[:n] {
		p := dataplane.Process{PID: c.Pid, Comm: cString(c.Comm[:])}
		if c.BinIno != 0 {
			p.Binary = dataplane.FileID{Dev: userDev(c.BinDev), Ino: c.BinIno}
		}
		out.Chain = append(out.Chain, p)
	}
	return out, nil
}

// sockoptName names the socket option a sockopt event carries (its family says the level, its
// port field the option).
func sockoptName(family, opt uint16) string {
	names := map[uint16]string{unix.IP_OPTIONS: "IP_OPTIONS"}
	if family == unix.AF_INET6 {
		names = map[uint16]string{unix.IPV6_RTHDR: "IPV6_RTHDR", unix.IPV6_2292RTHDR: "IPV6_2292RTHDR",
			unix.IPV6_HOPOPTS: "IPV6_HOPOPTS", unix.IPV6_2292HOPOPTS: "IPV6_2292HOPOPTS", unix.IPV6_DSTOPTS: "IPV6_DSTOPTS",
			unix.IPV6_2292DSTOPTS: "IPV6_2292DSTOPTS", unix.IPV6_RTHDRDSTOPTS: "IPV6_RTHDRDSTOPTS", unix.IPV6_2292PKTOPTIONS: "IPV6_2292PKTOPTIONS"}
	}
	if n, ok := names[opt]; ok {
		return n
	}
	return fmt.Sprintf("option %d of family %d", opt, family)
}
