import Accounts
import BlockDevices
import ImageIO

/// The stages of one card, in order. The station's job states carry the same names.
public enum CardStage: String, Sendable, Comparable {
    /// `downloading`: the station fetches the image from a server before the first byte.
    case downloading, writing, syncing, verifying, injecting, checking

    private var order: Int {
        switch self {
        case .downloading: -1
        case .writing: 0
        case .syncing: 1
        case .verifying: 2
        case .injecting: 3
        case .checking: 4
        }
    }

    public static func < (a: CardStage, b: CardStage) -> Bool { a.order < b.order }
}

/// What a pipeline tells whoever runs it, in order. Stage changes and accounts are never
/// dropped; progress within a stage is coalesced to `CardJob.progressInterval`.
public enum CardReport: Sendable {
    /// A new stage began. `progress` is the write engine's, for writing/syncing/verifying.
    case stage(CardStage, note: String?, unit: String?, progress: WriteProgress?)
    case progress(WriteProgress)
    /// The accounts the unit got, after injection and export and before the check: the
    /// station records them (name, uid, hash) before the job may end done.
    case accounts(unit: String, [ProvisionedAccount])
    /// The last report, sent once, on every ending.
    case finished(CardOutcome)
}

/// One account given to a unit. `generatedPassword` is in memory only, for the one who ran
/// the job; `exportedTo` says where it was written for the operator.
public struct ProvisionedAccount: Sendable, Equatable {
    public var name: String
    public var uid: Int
    public var gid: Int
    public var hash: String
    public var generatedPassword: String?
    public var exportedTo: String?

    public init(name: String, uid: Int, gid: Int, hash: String, generatedPassword: String? = nil, exportedTo: String? = nil) {
        self.name = name
        self.uid = uid
        self.gid = gid
        self.hash = hash
        self.generatedPassword = generatedPassword
        self.exportedTo = exportedTo
    }
}

public enum CardOutcome: Sendable {
    case done(CardResult)
    case failed(CardFailure)
    /// Stopped on request (Ctrl-C, `provision cancel`, a pulled card): the card is incomplete.
    case cancelled(String)
}

public struct CardResult: Sendable {
    public var write: WriteResult
    /// The device as judged on its descriptor (nil for a file target).
    public var facts: DeviceFacts?
    public var unit: String?
    public var accounts: [ProvisionedAccount] = []
    /// The injection's partition, when there was one.
    public var partition: Int?
    /// The capacity probe's result, when it ran.
    public var probe: CapacityProbe.Result?
    /// The card, identified before the write (block devices).
    public var card: CardIdentity?

    public init(write: WriteResult, facts: DeviceFacts? = nil, unit: String? = nil, accounts: [ProvisionedAccount] = [], partition: Int? = nil) {
        self.write = write
        self.facts = facts
        self.unit = unit
        self.accounts = accounts
        self.partition = partition
    }
}

/// Why a card's job failed, in words for the operator, with a kind for exit codes.
public struct CardFailure: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// The write engine's error (image, bmap, device, verification).
        case image(ImageIOError.Code)
        /// The safety policy refused the opened device.
        case refused
        /// Injecting accounts failed (the card is written).
        case accounts(AccountsError.Code)
        /// `e2fsck -fn` found problems, or generated passwords could not be exported.
        case check
    }
    public let kind: Kind
    public let message: String
    /// The card, when it was identified before the failure (issue 16).
    public var card: CardIdentity?
    /// Set when the failure is a verdict on the card itself: counterfeit (the capacity
    /// probe) or failing (it returned other data twice). The station remembers such cards.
    public var verdict: CardVerdict?

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    init(_ e: ImageIOError) { self.init(.image(e.code), e.message) }

    public var description: String { message }
}

/// Receives a pipeline's reports. Called on the pipeline's thread; must not block for long
/// and must not call back into the pipeline.
public protocol CardReportSink: Sendable {
    func receive(_ report: CardReport)
}

extension AsyncStream.Continuation: CardReportSink where Element == CardReport {
    public func receive(_ report: CardReport) { yield(report) }
}
