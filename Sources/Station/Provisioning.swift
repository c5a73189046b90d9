import Accounts
import ControlProtocol
import Foundation
import ImageIO
import Pipeline

/// Who a unit is and which accounts it gets: from the operator's inventory when the station
/// names one, else from the profile's `[[users]]`. The running sequence number is the job
/// number, which the ledger makes unique and monotonic; with a lab's shared ledger it is a
/// number unique in the whole lab (`Ledger.unitSequence`).
enum UnitPlan {
    static func make(profile: Profile, inventoryPath: String?, exportPath: String?, serial: String?, slot: String?, sequence: Int64) throws -> UnitProvisioning? {
        var users = profile.users.map(Self.spec)
        var unitName = serial.map { "unit-\($0)" } ?? String(format: "unit-%03lld", sequence)
        var hashMethod = HashMethod.sha512(rounds: nil)
        var export = exportPath
        if let inventoryPath {
            let inventory = try Inventory.load(path: inventoryPath)
            let assignment = try inventory.assignment(serial: serial, slot: slot, sequence: Int(sequence))
            unitName = assignment.unitName
            hashMethod = inventory.hashMethod
            export = inventory.passwordExport ?? exportPath
            // The inventory's users win over the profile's of the same name.
            for spec in assignment.users {
                if let i = users.firstIndex(where: { $0.name == spec.name }) { users[i] = spec } else { users.append(spec) }
            }
        }
        guard profile.inject, !users.isEmpty else { return nil }
        // A generated password with no export file would exist only in one announcement: refuse
        // before the card is written (StationConfig refuses such a slot at load already).
        if export == nil, let user = users.first(where: \.generatesPassword) {
            throw ProvisioningFailure(message: PasswordExportRule.nowhere(user: user.name, profile: profile.name))
        }
        let root: RootLocator = switch profile.root?.selector {
        case .partition(let n): .partition(n)
        case .label(let l): .label(l)
        case nil: .onlyExtPartition
        }
        return UnitProvisioning(unitName: unitName, users: users, root: root, hashMethod: hashMethod, passwordExport: export)
    }

    static func spec(_ u: Profile.User) -> UserSpec { u.userSpec }
}

// MARK: - From the pipeline's reports to the wire's types (at the station's boundary)

extension JobState {
    /// The final states as an SQL list ('done','failed',…), for "WHERE state NOT IN (…)".
    static let finalSQLList = allCases.filter(\.isFinal).map { "'\($0.rawValue)'" }.joined(separator: ",")

    init(_ stage: CardStage) {
        self = switch stage {
        case .downloading: .downloading
        case .writing: .writing
        case .syncing: .syncing
        case .verifying: .verifying
        case .injecting: .injecting
        case .checking: .checking
        }
    }
}

extension JobProgress {
    init(_ p: WriteProgress) {
        self.init(bytesDone: p.bytesDone, bytesTotal: p.bytesTotal, bytesPerSecond: p.bytesPerSecond, secondsRemaining: p.secondsRemaining)
    }
}

extension UnitAccount {
    init(_ a: ProvisionedAccount) {
        self.init(name: a.name, uid: a.uid, generatedPassword: a.generatedPassword, passwordExport: a.exportedTo)
    }
}

struct ProvisioningFailure: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}
