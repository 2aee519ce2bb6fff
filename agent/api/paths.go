package api

import "strings"

// The paths of the management port. Requests may omit the trailing slash.
// Paths marked async need the taskuuid header, answer at once and POST the
// result to the callbackurl header; each also answers inline under its
// SyncPath twin.
const (
	PathHealth  = "/health"  // GET, no auth: HealthReply
	PathMetrics = "/metrics" // GET: Prometheus text

	// Store and agent (core.go).
	PathEcho       = "/imagestore/echo/"        // any method; empty reply
	PathConnect    = "/imagestore/connect/"     // ConnectRequest → ConnectReply
	PathPing       = "/imagestore/ping/"        // async: PingRequest → PingReply
	PathSetQuota   = "/imagestore/setquota/"    // async: SetQuotaRequest → Capacity
	PathDebugSleep = "/imagestore/debug/sleep/" // async: DebugSleepRequest → empty

	// Jobs (jobs.go).
	PathProgress  = "/imagestore/progress/"   // ProgressRequest → ProgressReply
	PathJobList   = "/imagestore/job/list/"   // JobListRequest → JobListReply
	PathJobGet    = "/imagestore/job/get/"    // JobRequest → JobReply
	PathJobCancel = "/imagestore/job/cancel/" // JobRequest → JobReply

	// Upload dirs and install paths handed to KVM hosts.
	PathAllocUploadDir   = "/imagestore/allocuploaddir/"
	PathAllocInstallPath = "/imagestore/installpath/allocate"
	PathUpload           = "/imagestore/upload/" // PUT or POST, chunked stream of an upload:// import

	// Images: import, inspect, delete, collect (all async but images).
	PathImportBackup   = "/imagestore/import-backup/"
	PathImport         = "/imagestore/import/"
	PathImgChain       = "/imagestore/imgchain/"
	PathImgInfo        = "/imagestore/imginfo/"
	PathImages         = "/imagestore/images/"
	PathDelete         = "/imagestore/delete/"
	PathGC             = "/imagestore/gc/"
	PathGetImageHash   = "/imagestore/getimagehash/"
	PathTemplateCreate = "/imagestore/template/create/"

	// Download exports (async).
	PathExport    = "/imagestore/export/"
	PathDelExport = "/imagestore/delexp/"

	// NBD targets and read-only chains (async).
	PathExportNBDImage       = "/imagestore/exportnbdimage/"
	PathExportNBDImageCancel = "/imagestore/exportnbdimage/cancel/"
	PathExportRemoteTarget   = "/imagestore/export/remotetarget/"
	PathRemoteTargetDelete   = "/imagestore/remotetarget/delete/"

	// Transfers with KVM hosts over SSH (async).
	PathPullFromHost = "/imagestore/pullfromhost/"
	PathWriteToHost  = "/imagestore/writetohost/"
)

// SyncSuffix marks the inline twin of an async path.
const SyncSuffix = "-sync"

// SyncPath is the inline twin of an async path:
// "/imagestore/import-backup/" → "/imagestore/import-backup-sync/".
func SyncPath(path string) string { return strings.TrimRight(path, "/") + SyncSuffix + "/" }
