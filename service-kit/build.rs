// `sqlx::migrate!` embeds `migrations/` at compile time; without this, a new migration file
// would not rebuild the crate and would silently be left out.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
