mod helpers;
mod http;
mod library;
