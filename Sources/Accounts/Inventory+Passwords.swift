extension UserSpec {
    /// Whether this user gets a random password that someone must be told.
    public var generatesPassword: Bool {
        if case .generate = password { return true }
        return false
    }
}

extension Inventory {
    /// Whether any unit may get a generated password: a default user, or a user in a
    /// per-unit override, with password "generate".
    public var generatesPasswords: Bool {
        users.contains(where: \.generatesPassword)
            || overrides.values.contains { units in
                units.values.contains { $0.users?.values.contains { $0.password == "generate" } ?? false }
            }
    }
}
