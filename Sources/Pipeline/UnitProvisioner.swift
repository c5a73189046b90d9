import Accounts
import Foundation

/// inject → export → check: a unit's accounts into its root filesystem (libext2fs, no
/// mount), generated passwords into the operator's 0600 file, then `e2fsck -fn` must find
/// nothing. The one implementation, run by the card pipeline after a verified write and by
/// `provision inject` on a card or image file.
public enum UnitProvisioner {
    public enum Step: Sendable {
        case injecting(String)
        /// Injected and exported; the accounts are final.
        case injected([ProvisionedAccount])
        case checking(String)
    }

    public struct Result: Sendable {
        public var report: InjectionReport
        public var accounts: [ProvisionedAccount]
        public var check: FilesystemCheck?
    }

    /// - Parameters:
    ///   - path: what libext2fs opens; `childPath`: what e2fsck opens (they differ when the
    ///     device is reached through a descriptor of ours, `/proc/self/fd/N`).
    ///   - step: told of each step before it runs; throwing stops the work there.
    public static func provision(_ unit: UnitProvisioning, path: String, childPath: String? = nil,
                                 describe: (String) -> String = { $0},
                                 step: (Step) throws(CardFailure) -> Void) throws(CardFailure) -> Result {
        try step(.injecting("adding \(unit.users.map(\.name).joined(separator: ", ")) to \(unit.root)"))
        let report: InjectionReport
        do throws(AccountsError) {
            report = try Injector.inject(target: path, root: unit.root, users: unit.users, hashMethod: unit.hashMethod)
        } catch {
            throw CardFailure(.accounts(error.code), "injecting users failed: " + describe(error.message))
        }
        let generated = report.users.filter { $0.generatedPassword != nil }
        if let export = unit.passwordExport, !generated.isEmpty {
            do throws(AccountsError) { try PasswordExport(path: export).append(unit: unit.unitName, users: generated) } catch {
                // The accounts are on the card; their passwords would be lost with this job.
                throw CardFailure(.accounts(error.code), "cannot export the generated passwords: \(error.message)")
            }
        }
        let accounts = report.users.map {
            ProvisionedAccount(name: $0.name, uid: $0.uid, gid: $0.gid, hash: $0.hash, generatedPassword: $0.generatedPassword,
                               exportedTo: $0.generatedPassword != nil ? unit.passwordExport : nil)
        }
        try step(.injected(accounts))
        guard unit.check else { return Result(report: report, accounts: accounts, check: nil) }
        try step(.checking("e2fsck -fn on partition \(report.partition)"))
        let check: FilesystemCheck
        do throws(AccountsError) { check = try Injector.check(target: childPath ?? path, root: .partition(report.partition)) } catch {
            throw CardFailure(.accounts(error.code), "checking the filesystem failed: " + describe(error.message))
        }
        guard check.clean else {
            let lines = check.output.split(separator: "\n").prefix(3).joined(separator: " / ")
            throw CardFailure(.check, "e2fsck -fn found problems on partition \(report.partition) (exit \(check.exitStatus)): " + describe(lines))
        }
        return Result(report: report, accounts: accounts, check: check)
    }
}
