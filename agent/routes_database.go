package agent

// databaseBackupName is the image name database backups are stored under.
const databaseBackupName = "zsbak"
