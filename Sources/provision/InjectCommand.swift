import Accounts
import ArgumentParser
import Foundation
import Pipeline

/// `provision inject`: give a written card or an image file a user, offline, without
/// mounting it. The same library call the daemon makes after verifying a card.
struct InjectCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "inject",
        abstract: "Add or update a user in the root filesystem of a card or disk image, without mounting it.",
        discussion: """
            TARGET is a whole-disk block device or an image file with an MBR or GPT. The root \
            partition is found by --partition or --label, or is the only ext2/3/4 partition. \
            A generated password is printed once and never stored, unless --export names a 0600 file. \
            A block device must pass the safety policy `provision write` applies: a removable \
            USB or MMC card (or a loop device), not mounted or used as swap, not a system disk, \
            not write-protected; it is judged on an opened descriptor, and that device is edited.
            """)

    @Argument(help: "Whole-disk device (e.g. /dev/sdb) or disk image file.")
    var target: String

    @Option(help: "User name to add or update.")
    var user: String

    @Option(name: .customLong("password-hash"), help: "A crypt hash ($6$, $y$, $5$, $2b$), e.g. from mkpasswd -m sha-512.")
    var passwordHash: String?

    @Flag(name: .customLong("generate-password"), help: "Generate a random password and print it once.")
    var generatePassword = false

    @Flag(help: "Lock password login (SSH keys still work).")
    var locked = false

    @Option(name: .customLong("password-length"), help: "Length of a generated password.")
    var passwordLength = 20

    @Option(help: "Comma-separated supplementary groups (they must exist unless --create-groups).")
    var groups: String?

    @Flag(name: .customLong("create-groups"), help: "Create supplementary groups the image lacks.")
    var createGroups = false

    @Option(name: .customLong("ssh-key"), help: "File of OpenSSH public keys for ~/.ssh/authorized_keys (repeatable).")
    var sshKeyFiles: [String] = []

    @Option(help: "Root partition number.")
    var partition: Int?

    @Option(help: "Root filesystem label.")
    var label: String?

    @Flag(help: "Hash with yescrypt ($y$) instead of SHA-512 ($6$).")
    var yescrypt = false

    @Option(help: "SHA-512 rounds (default 5000).")
    var rounds: Int?

    @Option(help: "Fixed uid (default: allocated like useradd).")
    var uid: Int?

    @Option(help: "Login shell (default /bin/bash when the image has it, else /bin/sh).")
    var shell: String?

    @Option(help: "GECOS (full name) field.")
    var gecos: String?

    @Option(help: "Home directory (default /home/USER).")
    var home: String?

    @Option(help: "Append a generated password to this 0600 file (created if missing).")
    var export: String?

    @Flag(name: .customLong("no-check"), help: "Skip the e2fsck -fn check after writing.")
    var noCheck = false

    func validate() throws {
        let sources = [passwordHash != nil, generatePassword, locked].filter { $0 }.count
        guard sources == 1 else {
            throw ValidationError("give exactly one of --password-hash, --generate-password or --locked")
        }
        guard partition == nil || label == nil else {
            throw ValidationError("give --partition or --label, not both")
        }
        guard rounds == nil || !yescrypt else { throw ValidationError("--rounds applies to SHA-512, not --yescrypt") }
    }

    func run() throws {
        let device: InjectionTarget.Judged?
        do throws(CardFailure) { device = try InjectionTarget.judge(target) } catch {
            FileHandle.standardError.write(Data("provision inject: \(error.message)\n".utf8))
            throw ExitCode(77)  // EX_NOPERM, as provision write refuses a device
        }
        do {
            try inject(into: device)
        } catch {
            FileHandle.standardError.write(Data("provision inject: \(error.message)\n".utf8))
            throw ExitCode(Self.exitStatus(error.code))
        }
    }

    private func inject(into device: InjectionTarget.Judged?) throws(AccountsError) {
        var keys: [String] = []
        for file in sshKeyFiles {
            guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
                throw AccountsError(.io, "cannot read the SSH key file \(file)")
            }
            keys += text.split(separator: "\n").map(String.init)
                .filter { !$0.trimmingCharacters(in: .whitespaces).isEmpty && !$0.hasPrefix("#") }
        }
        let password: PasswordSource = if let passwordHash { .hash(passwordHash) }
            else if generatePassword { .generate(PasswordPolicy(length: passwordLength)) }
            else { .locked }
        let spec = UserSpec(name: user, uid: uid,
                            groups: groups?.split(separator: ",").map { String($0).trimmingCharacters(in: .whitespaces) } ?? [],
                            createMissingGroups: createGroups, shell: shell, gecos: gecos, home: home,
                            password: password, sshKeys: keys)
        let root: RootLocator = if let partition { .partition(partition) }
            else if let label { .label(label) } else { .onlyExtPartition }
        let method: HashMethod = yescrypt ? .yescrypt(cost: nil) : .sha512(rounds: rounds)
        let unit = UnitProvisioning(unitName: URL(fileURLWithPath: target).lastPathComponent, users: [spec], root: root,
                                    hashMethod: method, passwordExport: export, check: !noCheck)
        // The same inject → export → check as the daemon runs after writing a card.
        let result: UnitProvisioner.Result
        do throws(CardFailure) {
            result = try UnitProvisioner.provision(unit, path: device?.path ?? target, childPath: device?.pathForChild,
                                                   describe: { device?.describe($0) ?? $0 }) { _ in }
        } catch {
            switch error.kind {
            case .accounts(let code): throw AccountsError(code, error.message)
            default: throw AccountsError(.filesystem, error.message)
            }
        }
        let report = result.report
        for injected in report.users {
            print("\(injected.created ? "added" : "updated") \(injected.name) (uid \(injected.uid), gid \(injected.gid), home \(injected.home)) in partition \(report.partition) of \(target)")
            if let generated = injected.generatedPassword {
                print("generated password for \(injected.name): \(generated)")
            }
        }
        if result.check != nil { print("e2fsck -fn: clean") }
    }

    /// sysexits(3) meanings, so scripts can tell bad input from a bad card.
    static func exitStatus(_ code: AccountsError.Code) -> Int32 {
        switch code {
        case .invalidSpec, .invalidHash, .missingGroup, .conflict: 64      // EX_USAGE
        case .malformedFile, .partitionTable, .notExt, .inventory: 65      // EX_DATAERR
        case .partitionNotFound: 66                                        // EX_NOINPUT
        case .checker: 69                                                  // EX_UNAVAILABLE
        case .hashing: 70                                                  // EX_SOFTWARE
        case .noSpace, .export: 73                                         // EX_CANTCREAT
        case .io, .filesystem: 74                                          // EX_IOERR
        }
    }
}
