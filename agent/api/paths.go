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

	// Cancelling the management node's jobs (jobs.go).
	PathImportCancel = "/imagestore/import/cancel/"  // async: ImportCancelRequest → CancelReply
	PathCancelJob    = "/imagestore/canceljob-sync/" // sync only: CancelJobRequest → CancelReply

	// Files on the store host (files.go).
	PathGetLocalFileSize = "/imagestore/getlocalfilesize/"      // async: LocalFileSizeRequest → LocalFileSizeReply
	PathGetLocalCacheDir = "/imagestore/getlocalcachedir-sync/" // sync only: LocalCacheDirRequest → LocalCacheDirReply

	// Image metadata for disaster recovery (metadata.go; async, each with a -sync twin).
	PathGenerateMetadataFile = "/imagestore/generateimagemetadatafile/"   // MetadataRequest → MetadataFileReply
	PathCheckMetadataFile    = "/imagestore/checkimagemetadatafileexist/" // MetadataRequest → MetadataExistReply
	PathDumpMetadata         = "/imagestore/dumpimagemetadatatofile/"     // DumpMetadataRequest → empty
	PathGetMetadata          = "/imagestore/getimagesmetadata/"           // MetadataRequest → GetMetadataReply
	PathDeleteMetadata       = "/imagestore/deleteimagesmetadata/"        // DeleteMetadataRequest → DeleteMetadataReply

	// Paths the management node may call that imagestore does not
	// implement: each answers success:false, "<path> is not supported by
	// imagestore" (async ones through the callback), never 404.
	PathPackExportedImages = "/imagestore/pack-exported-images/"
	PathDeleteImagePackage = "/imagestore/delete-image-package"
	PathRemoteUpload       = "/imagestore/remote/upload/"
	PathArchiveData        = "/imagestore/archivedata/"
	PathUnpackData         = "/imagestore/unpackdata/"
	PathSyncData           = "/imagestore/syncdata/"
	PathFileDownload       = "/imagestore/file/download"
	PathFileUpload         = "/imagestore/file/upload"
	PathFileProgress       = "/imagestore/file/progress" // sync
	PathFileCancel         = "/imagestore/file/cancel"
	PathFileUnzip          = "/imagestore/file/unzip"
	PathFilesDelete        = "/imagestore/files/delete"
	PathUpgradeDeploy      = "/imagestore/upgrade/deploy"
)

// NotSupported is the error of a path imagestore does not implement.
func NotSupported(path string) string { return path + " is not supported by imagestore" }

// SyncSuffix marks the inline twin of an async path.
const SyncSuffix = "-sync"

// SyncPath is the inline twin of an async path:
// "/imagestore/import-backup/" → "/imagestore/import-backup-sync/".
func SyncPath(path string) string { return strings.TrimRight(path, "/") + SyncSuffix + "/" }
