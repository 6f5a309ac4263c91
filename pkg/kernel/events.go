package kernel

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"time"

	"github.com/cilium/ebpf/ringbuf"

	"github.com/tether-sh/tether/pkg/dataplane"
)

// ErrClosed is returned by EventReader.Read after Close.
var ErrClosed = errors.New("event reader closed")

// EventReader decodes the decisions the programs write to the ring buffer.
type EventReader struct {
	rd   *ringbuf.Reader
	boot time.Time
	rec  ringbuf.Record
}

// NewEventReader opens the pinned ring buffer. Events that arrived while no daemon was reading
// are still in it, up to its size; what did not fit is counted in Counters().RingBufferDrops.
func (k *Kernel) NewEventReader() (*EventReader, error) {
	rd, err := ringbuf.NewReader(k.events)
	if err != nil {
		return nil, fmt.Errorf("opening event ring buffer: %w", err)
	}
	return &EventReader{rd: rd, boot: k.bootTime}, nil
}

// Read blocks until the next event. After Close it returns ErrClosed.
func (r *EventReader) Read() (dataplane.Event, error) {
	for {
		if err := r.rd.ReadInto(&r.rec); err != nil {
			if errors.Is(err, ringbuf.ErrClosed) || errors.Is(err, os.ErrClosed) {
				return dataplane.Event{}, ErrClosed
			}
			return dataplane.Event{}, fmt.Errorf("reading event ring buffer: %w", err)
		}
		return DecodeEvent(r.rec.RawSample, r.boot)
	}
}

// Close stops Read.
func (r *EventReader) Close() error { return r.rd.Close() }

var eventSize = binary.Size(bpfTetherEvent{})

// DecodeEvent decodes one ring buffer record. boot is the wall-clock time of boot.
func DecodeEvent(raw []byte, boot time.Time) (dataplane.Event, error) {
	var e bpfTetherEvent
	if len(raw) < eventSize {
		return dataplane.Event{}, fmt.Errorf("event of %d bytes, want %d", len(raw), eventSize)
	}
	if _, err := binary.Decode(raw[:eventSize], binary.NativeEndian, &e); err != nil {
		return dataplane.Event{}, fmt.Errorf("decoding event: %w", err)
	}
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
		Port:       e.Dport,
		Comm:       cString(e.Comm[:]),
		BinaryPath: cString(e.Binary[:]),
		Target:     cString(e.Target[:]),
	}
	if e.BinIno != 0 {
		out.Binary = dataplane.FileID{Dev: userDev(e.BinDev), Ino: e.BinIno}
	}
	switch out.Kind {
	case dataplane.KindConnect4, dataplane.KindConnect6, dataplane.KindSendmsg4, dataplane.KindSendmsg6:
		out.Addr = netip.AddrFrom16(e.Daddr).Unmap()
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
