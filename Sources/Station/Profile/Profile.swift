/// A board profile: what to write onto a card (or a Tegra board) and how to make it that unit's.
///
/// Read from `images/NAME/profile.toml` or inline from the station config as
/// `[profiles.NAME]`; the format is documented in `images/README.md`. All paths are absolute
/// (or as given, when the document has no directory), resolved against the profile file's
/// directory. Parsing never reads the files a profile names — the images of most boards are
/// built elsewhere — `checkInputsExist()` does, with the line of the key that names them.
public struct Profile: Sendable, Equatable {
    public enum Kind: String, Sendable, CaseIterable {
        /// Write an image to a block device (SD card, USB stick, eMMC in a reader).
        case sd
        /// Flash a Tegra board over USB recovery mode (see `TegraInputs`).
        case tegra
    }

    public var name: String
    /// The `description` key: one line for people (status, logs).
    public var summary: String?
    public var kind: Kind
    /// Required for `sd` profiles.
    public var image: Image?
    /// The layout the image is expected to have, with each partition's role.
    public var partitions: [Partition]
    /// Where users are injected; set whenever `inject` is true.
    public var root: Root?
    /// Raw data placed at byte offsets after the image is written (e.g. sunxi U-Boot at 8 KiB).
    public var blobs: [Blob]
    public var users: [User]
    /// Whether users are written into the root filesystem (default: true when users are given).
    public var inject: Bool
    /// Required for `tegra` profiles.
    public var tegra: TegraInputs?
    /// Where the profile is defined (the file, and the `[profiles.NAME]` line for inline ones).
    public var location: ConfigLocation

    public init(name: String, summary: String? = nil, kind: Kind, image: Image? = nil,
                partitions: [Partition] = [], root: Root? = nil, blobs: [Blob] = [],
                users: [User] = [], inject: Bool = false, tegra: TegraInputs? = nil,
                location: ConfigLocation) {
        self.name = name
        self.summary = summary
        self.kind = kind
        self.image = image
        self.partitions = partitions
        self.root = root
        self.blobs = blobs
        self.users = users
        self.inject = inject
        self.tegra = tegra
        self.location = location
    }

    public struct Image: Sendable, Equatable {
        /// The image file: raw or compressed (gz, xz, zst; ImageIO detects which by magic bytes).
        public var file: String
        public var bmap: BmapSource
        /// Read the card back after writing and compare (default true).
        public var verify: Bool
        /// Check the card's real capacity before writing (issue 16; default true).
        public var probe: Bool
        /// Cards smaller than this are refused before the first byte is written.
        public var minDeviceSize: UInt64?
        public var location: ConfigLocation
    }

    public enum BmapSource: Sendable, Equatable {
        /// Look next to the image, as bmaptool does (`x.img.zst.bmap`, `x.img.bmap`, `x.bmap`).
        case discover
        /// This bmap file.
        case file(String)
        /// Write every byte of the image (`bmap = false`).
        case none
    }

    public struct Partition: Sendable, Equatable {
        public enum Role: String, Sendable, CaseIterable { case boot, root, data, firmware }
        public enum Filesystem: String, Sendable, CaseIterable {
            case vfat, ext4, ext3, ext2, iso9660, other
            /// Users can be injected through libext2fs only into these.
            public var isExt: Bool { self == .ext2 || self == .ext3 || self == .ext4 }
        }
        /// The partition number as the kernel counts it (1 = first).
        public var number: Int
        public var role: Role
        public var filesystem: Filesystem
        public var label: String?
        /// Expected start and size in bytes, when the profile states them.
        public var start: UInt64?
        public var size: UInt64?
        public var location: ConfigLocation
    }

    public struct Root: Sendable, Equatable {
        public enum Selector: Sendable, Equatable {
            case partition(Int)
            case label(String)
        }
        public var selector: Selector
        public var location: ConfigLocation
    }

    public struct Blob: Sendable, Equatable {
        public var file: String
        /// Byte offset on the card; a multiple of 512.
        public var offset: UInt64
        public var location: ConfigLocation
    }

    public struct User: Sendable, Equatable {
        public enum Password: Sendable, Equatable {
            /// Random per unit, shown once and exported to the operator.
            case generate
            /// No password login (`!` in shadow); SSH keys only.
            case locked
            /// A crypt(3) hash given in the profile, e.g. `$6$…`.
            case hash(String)
        }
        public var name: String
        public var uid: Int?
        public var groups: [String]
        public var shell: String?
        public var gecos: String?
        public var home: String?
        public var password: Password
        public var sshKeys: [String]
        /// `allow_system_uid = true`: the uid may be 0 or in a reserved range (see `UserSpec.systemUIDRanges`).
        public var allowSystemUID: Bool = false
        public var location: ConfigLocation
    }
}

/// Where something was defined: enough to build a `ConfigError` about it later (for example
/// when the image file turns out to be missing, or a blob overlaps the image's partitions).
public struct ConfigLocation: Sendable, Equatable {
    public var file: String
    public var line: Int?
    public var keyPath: String

    public init(file: String, line: Int?, keyPath: String) {
        self.file = file
        self.line = line
        self.keyPath = keyPath
    }

    public func error(_ message: String) -> ConfigError {
        ConfigError(file: file, line: line, keyPath: keyPath, message: message)
    }
}

extension TOMLDocument {
    /// The location of `path` in this document.
    public func location(of path: [TOMLKeyLocator.Segment]) -> ConfigLocation {
        ConfigLocation(file: source, line: locator.nearestLine(of: path), keyPath: TOMLKeyLocator.format(path))
    }
}
