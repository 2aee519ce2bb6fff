// Package api is the :8001 protocol as Go types: one exported constant per
// /imagestore/* path (paths.go) and the request and reply body of each,
// one file per area (core.go, jobs.go, and the files of the images,
// transfers, exports and NBD paths). The daemon (package agent) decodes
// these requests and encodes these replies; cmd/imagestore and other
// clients use the same types instead of redeclaring them.
//
// Every reply object also carries the envelope fields "success" (bool) and
// "error" (string, "" on success), merged into the same object; a client
// decodes them with Reply embedded beside the reply type.
//
// Integer fields are JSON numbers: the management node is written in Java,
// and a long must never arrive as a string. Request fields of type Int
// also accept 1.0E10 and numeric strings, as some clients send them.
//
// A request type with required fields has a Validate method, which the
// daemon calls after decoding; its errors are the protocol's error texts.
//
// This package depends on nothing in the module but blobstore's value
// types and internal helpers, so a client links none of the daemon.
package api
