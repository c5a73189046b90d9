import Accounts
import BlockDevices
import ImageIO

/// Everything one card's pipeline needs, decided before it starts: which image, which
/// device, which rules, which accounts. Both `provision write` and `provisiond` fill one in
/// and hand it to `CardPipeline`; nothing else writes a card.
public struct CardJob: Sendable {
    /// The image file (raw, compressed or an archive of one image), or an http(s):// URL.
    public var image: String
    /// The device (or file) to write, as a path: opened once, then judged on its descriptor.
    public var target: String
    /// Follow a symlink at `target` (off by default: a link planted where a file target is
    /// expected must not redirect the write).
    public var followSymlinks = false
    /// The safety rules the opened device must pass (nil: none, for file targets only).
    public var policy: SafetyPolicy?
    /// The media an earlier verdict was made for (the daemon's udev event): a different card
    /// on the same node is refused before the first byte.
    public var expectedMedia: MediaIdentity?
    /// What the card must hold at least, beyond the image itself (a profile's minimum).
    public var minimumDeviceSize: UInt64?
    public var bmap: BmapChoice = .discover
    /// Write the image file as it is, whatever its first bytes look like (`--raw`).
    public var forceRaw = false
    public var verify = true
    /// Capacity probe before the first image byte (issue 16); block devices only.
    /// `provision write --no-probe` and a profile's `probe = false` turn it off.
    public var probeCapacity = true
    /// Where the probe keeps what it overwrote until it restores it (an unlinked file; the
    /// station's cache directory), but for the runs it keeps in pipes: nil keeps it in memory.
    public var probeStashDirectory: String?
    /// How many of the probe's first runs it keeps in pipes (`CapacityProbe.pipedRuns(slots:)`).
    public var probePipedRuns = CapacityProbe.pipedRuns
    /// Asked with the card's identity before the probe: a refusal (a card found counterfeit
    /// or failing before, with the date and reason) fails the job before anything is written.
    public var knownCard: (@Sendable (CardIdentity) -> String?)?
    public var chunkSize = 4 << 20
    /// Buffers in flight at most (with a `budget`: taken one at a time as the card needs them).
    public var bufferCount = 4
    /// The station's buffer budget (issue 18): every card's buffers come from it and go back
    /// to it after each chunk. nil (`provision write`): the write's own fixed ring.
    public var budget: BufferBudget?
    /// Raw boot-loader blobs laid over the image, and a check of the image's first chunk
    /// against them (partition table vs. blob placement) before anything is written.
    public var blobs: [RawBlob] = []
    public var inspectFirstChunk: (@Sendable (UnsafeRawBufferPointer) throws -> Void)?
    /// Where a compressed image is decompressed once for a batch (the station's cache).
    public var supplier: (any ImageSupplier)?
    /// The unit's accounts, worked out on the pipeline's thread before the card is touched
    /// (it may read the operator's inventory file); nil or returning nil: no injection.
    public var provisioning: (@Sendable () throws -> UnitProvisioning?)?
    /// Called after the safety verdict on the opened device and before its first byte:
    /// `provision write` asks the operator here. Throwing stops the job, nothing written.
    public var confirm: (@Sendable (DeviceFacts?) throws -> Void)?
    /// Progress within a stage is reported at most this often (stage changes at once).
    public var progressInterval: Duration = .seconds(1)
    /// Test-only: runs after the final sync and before verification.
    public var testHookBeforeVerify: (@Sendable (WriteTarget) -> Void)?

    public init(image: String, target: String, policy: SafetyPolicy?) {
        self.image = image
        self.target = target
        self.policy = policy
    }
}

/// Where an image's bmap comes from.
public enum BmapChoice: Sendable, Equatable {
    /// Write the whole image.
    case none
    case file(String)
    /// IMAGE.bmap (or with extensions stripped) next to the image, as bmaptool finds it.
    case discover
}

/// A shared, already decompressed copy of an image: the station's cache, which a batch of
/// cards reads at their own speeds.
public protocol ImageSupplier: Sendable {
    /// `downloading` is told the bytes received and the announced total while an image
    /// named by URL is fetched first (not called for a local file). `cancelled` is asked
    /// meanwhile: a job cancelled (or its card pulled) stops waiting for the download.
    func supply(image: String, bmap: Bmap?, cancelled: @escaping @Sendable () -> Bool,
                downloading: @escaping @Sendable (UInt64, UInt64?) -> Void) throws(ImageIOError) -> SuppliedImage
    /// The pipeline no longer reads what `supply` gave (called on every ending).
    func release(_ image: SuppliedImage)
}

public struct SuppliedImage: Sendable {
    public let source: ImageSource
    /// The supplier's handle on its entry, for `release`.
    public let token: String?
    /// For the operator: "decompressing zst once for every card", say.
    public let note: String?
    /// The supplier checked the mapped ranges against the bmap already.
    public let checkedAgainstBmap: Bool

    public init(source: ImageSource, token: String?, note: String?, checkedAgainstBmap: Bool) {
        self.source = source
        self.token = token
        self.note = note
        self.checkedAgainstBmap = checkedAgainstBmap
    }
}

/// Who the unit is and which accounts it gets.
public struct UnitProvisioning: Sendable {
    public var unitName: String
    public var users: [UserSpec]
    public var root: RootLocator
    public var hashMethod: HashMethod
    /// The 0600 file generated passwords are appended to (nil: they are only reported).
    public var passwordExport: String?
    /// Run `e2fsck -fn` afterwards.
    public var check = true

    public init(unitName: String, users: [UserSpec], root: RootLocator, hashMethod: HashMethod, passwordExport: String?, check: Bool = true) {
        self.unitName = unitName
        self.users = users
        self.root = root
        self.hashMethod = hashMethod
        self.passwordExport = passwordExport
        self.check = check
    }
}
