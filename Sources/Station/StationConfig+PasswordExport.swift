import Accounts

/// No generated password is ever lost (issue 15): a station whose units get generated
/// passwords must have a file to append them to (0600, for the operator). Without one the
/// only copy would be a single announcement on the control socket, gone once no admin was
/// watching. A slot's profile is refused when the config is loaded (`provision config
/// check`, daemon start and reload); any other job (a manual `flash --profile`) before its
/// card is written (`UnitPlan.make`).
enum PasswordExportRule {
    static func nowhere(user: String, profile: String) -> String {
        """
        user \(user) of profile \(profile) gets a generated password, but the station has nowhere to put it: \
        set password_export = "/var/lib/provision/passwords.tsv" in [station] (or in the inventory), \
        or give the user a hash or password = "locked"
        """
    }
}

extension StationConfig {
    /// The export file the daemon will use: the inventory's, else the station's. The
    /// inventory is read here only to learn that; a broken one fails its jobs as before.
    func effectivePasswordExport() -> (path: String?, inventory: Inventory?) {
        let inventory = inventoryPath.flatMap { try? Inventory.load(path: $0) }
        return (inventory?.passwordExport ?? passwordExportPath, inventory)
    }

    /// Refuses a slot whose profile (or the inventory) generates passwords when there is no
    /// export file; the error points at the user that generates one.
    func requirePasswordExport() throws {
        let (export, inventory) = effectivePasswordExport()
        guard export == nil else { return }
        for slot in slots {
            guard let profile = profiles[slot.profile], profile.inject else { continue }
            if let user = profile.users.first(where: { $0.password == .generate }) {
                throw user.location.error(PasswordExportRule.nowhere(user: user.name, profile: profile.name))
            }
            if let inventory, !profile.users.isEmpty || !inventory.users.isEmpty, inventory.generatesPasswords {
                throw ConfigError(file: inventoryPath ?? file, line: nil, keyPath: "password_export", message: """
                    the inventory gives units generated passwords (slot \(slot.name), profile \(profile.name)), \
                    but neither it nor [station] names a password_export file to put them in
                    """)
            }
        }
    }
}
