/// What went wrong while reading or changing a unit's accounts, as a value a person can act on.
///
/// The `code` lets callers (the daemon, the CLI's exit status) branch without parsing text;
/// the `message` says what failed, where (file and line, partition and offset), and what to do.
/// Follows swift-service-lifecycle's shape: a struct over a private-ish enum, so new codes
/// do not break callers that switch with a default.
public struct AccountsError: Error, CustomStringConvertible, Sendable, Equatable {
    public enum Code: String, Sendable, Equatable {
        /// A line in passwd/shadow/group/gshadow or login.defs cannot be parsed.
        case malformedFile
        /// A requested user or group conflicts with what the image already has.
        case conflict
        /// A supplementary group named by the spec does not exist in the image.
        case missingGroup
        /// A user name, uid, GECOS, shell or home does not fit passwd's format.
        case invalidSpec
        /// A pre-made hash is not one of the accepted crypt formats, or is one the image's
        /// own login cannot verify (LoginCapabilities).
        case invalidHash
        /// libcrypt refused to hash or to generate a salt.
        case hashing
        /// No MBR or GPT, or a damaged one.
        case partitionTable
        /// The partition named by the profile does not exist.
        case partitionNotFound
        /// The partition exists but does not hold an ext2/3/4 filesystem.
        case notExt
        /// The filesystem lacks free blocks or inodes for the new files.
        case noSpace
        /// libext2fs reported an error.
        case filesystem
        /// open/read/write/stat on a host file or device failed.
        case io
        /// The inventory file cannot be used.
        case inventory
        /// The password export file cannot be used safely.
        case export
        /// An external checker (e2fsck) could not be run.
        case checker
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }
}
