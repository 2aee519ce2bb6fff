package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
)

// Reply is the envelope of every reply: success, and the error ("" on
// success). The daemon merges it into the reply object; a client embeds
// it beside the reply type, struct{ api.Reply; api.PingReply }.
type Reply struct {
	Success bool   `json:"success"`
	Error   string `json:"error"`
}

// Int is an integer request field. It accepts a JSON number (integer or
// float, as Java clients may send 1.0E10) or a numeric string, and is
// always encoded as a JSON number.
type Int int64

// UnmarshalJSON accepts a number, a numeric string, null or "" (zero).
// Its errors are *json.UnmarshalTypeError, so encoding/json adds the
// field's name: "maxCapacity: 1e30 is out of range (…)".
func (f *Int) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	if s == "" || s == "null" {
		*f = 0
		return nil
	}
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		*f = Int(n)
		return nil
	}
	v, err := strconv.ParseFloat(s, 64)
	var ne *strconv.NumError
	switch {
	case err != nil && errors.As(err, &ne) && errors.Is(ne.Err, strconv.ErrRange),
		err == nil && (v > 1<<62 || v < -(1<<62)):
		return &json.UnmarshalTypeError{Value: fmt.Sprintf("%s is out of range (at most %d)", b, int64(1<<62)), Type: reflect.TypeFor[Int]()}
	case err != nil || v != v:
		return &json.UnmarshalTypeError{Value: fmt.Sprintf("%s is not a number", b), Type: reflect.TypeFor[Int]()}
	}
	*f = Int(v)
	return nil
}

// FieldError rewrites encoding/json's type errors as "field <name>: …"
// (the JSON name, dotted for nested fields); other errors pass unchanged.
func FieldError(err error) error {
	var te *json.UnmarshalTypeError
	if !errors.As(err, &te) || te.Field == "" {
		return err
	}
	if te.Type == reflect.TypeFor[Int]() {
		return fmt.Errorf("field %s: %s", te.Field, te.Value)
	}
	return fmt.Errorf("field %s: a JSON %s cannot be %s", te.Field, te.Value, te.Type)
}

// missing is the error of an absent required field.
func missing(field string) error { return fmt.Errorf("missing field %s", field) }

// Capacity is embedded by replies that report the store's capacity. With
// a quota, the total is the quota and free what it still allows.
type Capacity struct {
	TotalSize int64 `json:"totalSize"`
	FreeSize  int64 `json:"freeSize"`
}

// ConnectRequest is the body of PathConnect: the management node's uuid
// for this store, which ping reports back.
type ConnectRequest struct {
	UUID string `json:"uuid"`
}

// Validate checks the required fields.
func (q *ConnectRequest) Validate() error {
	if q.UUID == "" {
		return missing("uuid")
	}
	return nil
}

// StorageInfo says how KVM hosts write into upload dirs. The management
// node stores it as a tag: every value is non-empty and has no "::".
type StorageInfo struct {
	Type    string `json:"type"`    // "sshfs" or "nfs"
	URL     string `json:"url"`     // the store's root (sshfs) or its NFS export
	Options string `json:"options"` // mount options ("defaults" for sshfs)
}

// ConnectReply answers PathConnect. IPAddresses is never empty and holds
// no address containing "::"; StorageInfo is complete or absent.
type ConnectReply struct {
	Capacity
	IPAddresses []string     `json:"ipAddresses"`
	StorageInfo *StorageInfo `json:"storageInfo,omitempty"`
	IORate      int          `json:"ioRate"`
	SupportFuse bool         `json:"supportFuse"`
	UUID        string       `json:"uuid"`
}

// PingRequest is the body of PathPing (async).
type PingRequest struct {
	UUID string `json:"uuid"`
}

// PingReply answers PathPing: the uuid the store was connected with.
type PingReply struct {
	Capacity
	UUID string `json:"uuid"`
}

// SetQuotaRequest is the body of PathSetQuota (async); its reply is a
// Capacity. 0 removes the quota.
type SetQuotaRequest struct {
	MaxCapacity *Int `json:"maxCapacity"` // bytes
}

// Validate checks the required fields.
func (q *SetQuotaRequest) Validate() error {
	if q.MaxCapacity == nil {
		return missing("maxCapacity")
	}
	if *q.MaxCapacity < 0 {
		return fmt.Errorf("maxCapacity %d is negative", *q.MaxCapacity)
	}
	return nil
}

// DebugSleepRequest is the body of PathDebugSleep (async, only with the
// debug setting): a job that only waits, cancellably.
type DebugSleepRequest struct {
	Millis Int  `json:"millis"`
	Backup bool `json:"backup"` // take a parallelismDegree slot
}

// HealthReply answers PathHealth: "ok", or "degraded" (HTTP 200: the
// store serves, some features cannot) with the reasons, e.g. qemu-img or
// qemu-nbd missing. A store that cannot answer is HTTP 503.
type HealthReply struct {
	Status  string   `json:"status"` // "ok" or "degraded"
	Reasons []string `json:"reasons,omitempty"`
}
