import Accounts
import ControlProtocol
import Foundation

/// Who a unit is and which accounts it gets: from the operator's inventory when the station
/// names one, else from the profile's `[[users]]`. The running sequence number is the job
/// number, which the ledger makes unique and monotonic.
struct UnitPlan: Sendable {
    var unitName: String
    var users: [UserSpec]
    var root: RootLocator
    var hashMethod: HashMethod
    var passwordExport: String?

    static func make(profile: Profile, inventoryPath: String?, exportPath: String?, serial: String?, slot: String?, sequence: Int64) throws -> UnitPlan? {
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
        let root: RootLocator = switch profile.root?.selector {
        case .partition(let n): .partition(n)
        case .label(let l): .label(l)
        case nil: .onlyExtPartition
        }
        return UnitPlan(unitName: unitName, users: users, root: root, hashMethod: hashMethod, passwordExport: export)
    }

    static func spec(_ u: Profile.User) -> UserSpec {
        let password: PasswordSource = switch u.password {
        case .generate: .generate(PasswordPolicy())
        case .locked: .locked
        case .hash(let h): .hash(h)
        }
        return UserSpec(name: u.name, uid: u.uid, groups: u.groups, shell: u.shell, gecos: u.gecos, home: u.home,
                        password: password, sshKeys: u.sshKeys)
    }
}

extension SDJob {
    /// injecting → checking: the unit's accounts go into its root filesystem through
    /// libext2fs (no mount), then `e2fsck -fn` must find nothing.
    func provision(_ plan: UnitPlan, device: String) throws -> [UnitAccount] {
        context.transition(.injecting, "adding \(plan.users.map(\.name).joined(separator: ", ")) to \(plan.root)", unit: plan.unitName)
        let report: InjectionReport
        do {
            report = try Injector.inject(target: device, root: plan.root, users: plan.users, hashMethod: plan.hashMethod)
        } catch {
            throw ProvisioningFailure(message: "injecting users failed: \(error.message)")
        }
        let station = context.station, id = context.record.id
        let rows = report.users.map { (name: $0.name, uid: $0.uid, hash: $0.hash) }
        blockingAwait { await station.recordUsers(id, rows) }
        let generated = report.users.filter { $0.generatedPassword != nil }
        if let path = plan.passwordExport, !generated.isEmpty {
            do { try PasswordExport(path: path).append(unit: plan.unitName, users: generated) } catch {
                throw ProvisioningFailure(message: "cannot export the generated passwords: \(error.message)")
            }
        }
        context.transition(.checking, "e2fsck -fn on partition \(report.partition)", unit: plan.unitName)
        let check: FilesystemCheck
        do { check = try Injector.check(target: device, root: plan.root) } catch {
            throw ProvisioningFailure(message: "checking the filesystem failed: \(error.message)")
        }
        guard check.clean else {
            throw ProvisioningFailure(message: "e2fsck -fn found problems on partition \(report.partition) (exit \(check.exitStatus)): \(check.output.split(separator: "\n").prefix(3).joined(separator: " / "))")
        }
        return report.users.map { UnitAccount(name: $0.name, uid: $0.uid, generatedPassword: $0.generatedPassword) }
    }
}

struct ProvisioningFailure: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}
